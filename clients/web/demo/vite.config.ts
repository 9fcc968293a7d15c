import { defineConfig } from "vite";

import { lamplightDevBackend } from "./server/dev-backend.js";

// The demo page. `npm run demo` serves it with the development-only backend (tokens + publishing).
export default defineConfig({
  root: import.meta.dirname,
  plugins: [lamplightDevBackend()],
  server: { port: 5173, strictPort: true },
  preview: { port: 4173 },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
    rollupOptions: {
      onwarn(warning, warn) {
        // TanStack Query's "use client" markers mean nothing in a client-only bundle.
        if (warning.code === "MODULE_LEVEL_DIRECTIVE") return;
        warn(warning);
      },
    },
  },
});
