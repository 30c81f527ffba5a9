#!/usr/bin/env node
// Compiles the Solidity sources of medchain with the pinned solc (package.json: "solc": "0.8.37")
// and writes one artifact per contract to medchain/artifacts/<Name>.json, which the Python package
// loads at run time (so running medchain needs only Python).
//
//   node compile.js              compile every contract in CONTRACTS and write the artifacts
//   node compile.js --check      compile and compare with the committed artifacts (exit 1 if they differ)
//   node compile.js --out DIR    write the artifacts to DIR instead
//
// Adding a contract (e.g. Bridge.sol) is adding its file name to CONTRACTS. Each file must define
// a contract with the file's base name.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const CONTRACTS = ["TaskLedger.sol", "Bridge.sol"];

// Everything that changes the bytecode is set explicitly here and recorded in the artifact.
const SETTINGS = {
  evmVersion: "cancun", // py-evm (eth-tester) lacks osaka; anvil and geth accept cancun
  optimizer: { enabled: true, runs: 200 },
  viaIR: false,
  metadata: { bytecodeHash: "ipfs", appendCBOR: true },
  outputSelection: {
    "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object", "evm.methodIdentifiers"] },
  },
};

const HERE = __dirname;
const DEFAULT_OUT = path.join(HERE, "..", "medchain", "artifacts");

function sha256(text) {
  return crypto.createHash("sha256").update(text, "utf8").digest("hex");
}

function compileAll() {
  const sources = {};
  for (const file of CONTRACTS) {
    sources[file] = { content: fs.readFileSync(path.join(HERE, file), "utf8") };
  }
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage + "\n");
  if (errors.length) throw new Error(`solc reported ${errors.length} error(s)`);

  const artifacts = {};
  for (const file of CONTRACTS) {
    const name = path.basename(file, ".sol");
    const c = output.contracts[file] && output.contracts[file][name];
    if (!c) throw new Error(`${file} does not define a contract named ${name}`);
    artifacts[name] = {
      contractName: name,
      sourceName: `contracts/${file}`,
      sourceSha256: sha256(sources[file].content),
      compiler: { name: "solc", version: solc.version() },
      settings: {
        evmVersion: SETTINGS.evmVersion,
        optimizer: SETTINGS.optimizer,
        viaIR: SETTINGS.viaIR,
        metadata: SETTINGS.metadata,
      },
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
      methodIdentifiers: c.evm.methodIdentifiers,
    };
  }
  return artifacts;
}

function main(argv) {
  const check = argv.includes("--check");
  const outIdx = argv.indexOf("--out");
  const outDir = outIdx >= 0 ? path.resolve(argv[outIdx + 1]) : DEFAULT_OUT;
  const artifacts = compileAll();
  let stale = 0;
  for (const [name, art] of Object.entries(artifacts)) {
    const file = path.join(outDir, `${name}.json`);
    const text = JSON.stringify(art, null, 2) + "\n";
    if (check) {
      const old = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, "utf8")) : null;
      const same = old && old.bytecode === art.bytecode && old.deployedBytecode === art.deployedBytecode &&
        JSON.stringify(old.abi) === JSON.stringify(art.abi);
      console.log(`${same ? "ok   " : "STALE"} ${path.relative(process.cwd(), file)}`);
      if (!same) stale += 1;
    } else {
      fs.mkdirSync(outDir, { recursive: true });
      fs.writeFileSync(file, text);
      console.log(`wrote ${path.relative(process.cwd(), file)} (solc ${art.compiler.version}, ` +
        `${(art.deployedBytecode.length - 2) / 2} bytes deployed)`);
    }
  }
  if (stale) {
    console.error(`${stale} artifact(s) differ from the sources: run \`node compile.js\` in contracts/`);
    process.exit(1);
  }
}

main(process.argv.slice(2));
