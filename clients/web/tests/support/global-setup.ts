/** Before the e2e run: check the prerequisites loudly, and build the demo page once. */

import { build } from "vite";

import { DEMO_DIR, requireChromium, requireLamplight } from "./env.js";

export default async function setup(): Promise<void> {
  requireLamplight();
  requireChromium();
  await build({ root: DEMO_DIR, logLevel: "warn", configFile: `${DEMO_DIR}/vite.config.ts` });
}
