import { defineConfig } from "vitest/config";

// End-to-end tests: a real lamplight (target/debug/lamplight), real gRPC publishers, Debian's Chromium via
// playwright-core. One file at a time: they start servers and a browser, and the machine has two cores.
export default defineConfig({
  test: {
    include: ["tests/e2e/**/*.test.ts"],
    environment: "node",
    fileParallelism: false,
    testTimeout: 60_000,
    hookTimeout: 90_000,
    globalSetup: ["tests/support/global-setup.ts"],
    reporters: ["default"],
  },
});
