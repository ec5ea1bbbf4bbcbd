// The receivers of the four source systems, verifying Herald's webhooks the way each
// integration guide tells its readers to: an HMAC-SHA256 over JSON.stringify of the parsed
// body. Herald's test suite runs this with the requests one of its receivers recorded.
//
//   node verify.js cases.json
//
// cases.json: [{"guide", "body" (base64 of the bytes received), "signature" (the header's
// value), "secret", "sent" (the producer's data as it was published), "payload"}].
// Prints one line per failure and exits 1 if there is any; else prints "verified N".

"use strict";
const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const CryptoJS = require(path.join(__dirname, "node_modules", "crypto-js"));

// Each guide's check, as its snippet writes it; `payload` is the parsed request body.
const guides = {
  // OpenTrack: X-OpenTrack-Signature, hex.
  opentrack: (payload, secret) =>
    crypto.createHmac("sha256", secret).update(JSON.stringify(payload)).digest("hex"),
  // Punt Uit: x-hook-signature, base64, with CryptoJS.
  puntuit: (payload, secret) => {
    const hash = CryptoJS.HmacSHA256(JSON.stringify(payload), secret);
    return CryptoJS.enc.Base64.stringify(hash);
  },
  // PackNet: x-packsize-signature, base64.
  packnet: (payload, secret) =>
    crypto.createHmac("sha256", secret).update(JSON.stringify(payload)).digest("base64"),
  // The Automation API: X-Signature, base64.
  automation: (payload, secret) =>
    crypto.createHmac("sha256", secret).update(JSON.stringify(payload)).digest("base64"),
};

const cases = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const failures = [];
for (const [i, c] of cases.entries()) {
  const body = Buffer.from(c.body, "base64").toString("utf8");
  const fail = (why) => failures.push(`case ${i} (${c.guide}, ${c.payload}): ${why}\n  body: ${body}`);
  let parsed;
  try {
    parsed = JSON.parse(body);
  } catch (e) {
    fail(`not JSON: ${e.message}`);
    continue;
  }
  // The body is byte for byte what JSON.stringify makes of it...
  if (JSON.stringify(parsed) !== body) {
    fail(`JSON.stringify(JSON.parse(body)) differs:\n  want: ${JSON.stringify(parsed)}`);
    continue;
  }
  // ...its data is the producer's data as JavaScript reads it...
  const data = c.payload === "envelope" ? parsed.data : parsed;
  const expected = JSON.stringify(JSON.parse(c.sent));
  if (JSON.stringify(data) !== expected) {
    fail(`data differs from the producer's:\n  want: ${expected}\n  got:  ${JSON.stringify(data)}`);
    continue;
  }
  // ...and the guide's own check accepts the signature.
  const wanted = guides[c.guide](parsed, c.secret);
  if (wanted !== c.signature) {
    fail(`signature ${c.signature} rejected; the guide computes ${wanted}`);
  }
}
for (const f of failures.slice(0, 20)) console.log(f);
if (failures.length > 0) {
  console.log(`${failures.length} of ${cases.length} failed`);
  process.exit(1);
}
console.log(`verified ${cases.length}`);
