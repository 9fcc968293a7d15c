import { QueryClient, QueryClientProvider } from "@tanstack/react-query";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";

import { LamplightProvider } from "../../src/react/index.js";
import { App } from "./App.js";
import { config, fetchToken } from "./config.js";
import "./styles.css";

const queryClient = new QueryClient({ defaultOptions: { queries: { staleTime: 10_000, retry: 1 } } });

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <QueryClientProvider client={queryClient}>
      <LamplightProvider
        baseUrl={config.server}
        getToken={fetchToken}
        heartbeatIntervalMs={config.heartbeatMs}
        backoff={{ maxMs: config.backoffMaxMs, initialMs: Math.min(500, config.backoffMaxMs) }}
      >
        <App />
      </LamplightProvider>
    </QueryClientProvider>
  </StrictMode>,
);
