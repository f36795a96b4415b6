// Validates an AsyncAPI document with the AsyncAPI parser and its Avro schema parser.
// Usage: CALLISTO_ASYNCAPI_MODULES=DIR/node_modules node validate.mjs DOCUMENT.json
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(`${process.env.CALLISTO_ASYNCAPI_MODULES}/`);
const { Parser } = require('@asyncapi/parser');
const { AvroSchemaParser } = require('@asyncapi/avro-schema-parser');

const parser = new Parser();
parser.registerSchemaParser(AvroSchemaParser());
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], 'utf8'));
const severities = ['error', 'warning', 'information', 'hint'];
for (const d of diagnostics) {
  console.error(`${severities[d.severity]} ${d.code} at ${d.path.join('.')}: ${d.message}`);
}
if (!document || diagnostics.some((d) => d.severity === 0)) {
  process.exit(1);
}
console.log(`valid: ${document.messages().length} messages in ${document.channels().length} channels`);
