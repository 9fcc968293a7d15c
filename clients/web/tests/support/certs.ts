/**
 * Certificates made at run time for the HTTPS tests (nothing private is committed): a throwaway CA and a
 * server certificate it signs for `localhost` and `127.0.0.1`, written by the `openssl` CLI into a fresh
 * temporary directory, valid for a day.
 */

import { execFileSync } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

export interface TestCertificates {
  /** PEM file: the server certificate followed by the CA (the chain a server sends). */
  readonly certFile: string;
  /** PEM file: the server's PKCS#8 private key. */
  readonly keyFile: string;
  /** The CA certificate (PEM), for Node clients' `ca`. */
  readonly caPem: string;
  readonly certPem: string;
  readonly keyPem: string;
  /**
   * base64 SHA-256 of the CA's SubjectPublicKeyInfo: what Chromium's `--ignore-certificate-errors-spki-list`
   * takes, so the browser trusts chains through this CA and nothing else.
   */
  readonly caSpkiSha256: string;
  /** Removes the directory. */
  remove(): void;
}

function openssl(args: string[], cwd: string): void {
  try {
    execFileSync("openssl", args, { cwd, stdio: ["ignore", "pipe", "pipe"] });
  } catch (err) {
    const e = err as { code?: string; stderr?: Buffer };
    if (e.code === "ENOENT") throw new Error("openssl is missing: apt-get install -y openssl");
    throw new Error(`openssl ${args.join(" ")} failed: ${e.stderr?.toString() ?? String(err)}`);
  }
}

/** A CA and a server certificate for localhost / 127.0.0.1 (P-256 keys). */
export function makeCertificates(): TestCertificates {
  const dir = mkdtempSync(path.join(tmpdir(), "lamplight-certs-"));
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  openssl(
    ["req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=lamplight e2e CA",
      "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
    dir,
  );
  openssl(["req", ...ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"], dir);
  writeFileSync(
    path.join(dir, "server.ext"),
    [
      "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "basicConstraints=critical,CA:FALSE",
      "keyUsage=critical,digitalSignature",
      "extendedKeyUsage=serverAuth",
    ].join("\n") + "\n",
  );
  openssl(
    ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
      "-days", "1", "-extfile", "server.ext"],
    dir,
  );
  const caPem = readFileSync(path.join(dir, "ca.pem"), "utf8");
  const leafPem = readFileSync(path.join(dir, "server.pem"), "utf8");
  const keyPem = readFileSync(path.join(dir, "server.key"), "utf8");
  const certPem = leafPem + caPem;
  const certFile = path.join(dir, "chain.pem");
  writeFileSync(certFile, certPem);
  const spki = new X509Certificate(caPem).publicKey.export({ type: "spki", format: "der" });
  return {
    certFile,
    keyFile: path.join(dir, "server.key"),
    caPem,
    certPem,
    keyPem,
    caSpkiSha256: createHash("sha256").update(spki).digest("base64"),
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
