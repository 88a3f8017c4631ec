// Unit tests of what the client declares (out/capabilities.js, no VS Code needed):
//   npm test
const assert = require('node:assert/strict');
const { test } = require('node:test');
const { experimentalCapabilities, PARTIAL_COMPLETION } = require('../out/capabilities.js');

test('partial completions are declared only when streaming is on', () => {
  assert.equal(experimentalCapabilities(undefined, true)[PARTIAL_COMPLETION], true);
  assert.equal(PARTIAL_COMPLETION in experimentalCapabilities(undefined, false), false);
});

test('other experimental capabilities are kept either way', () => {
  const existing = { other: 1, [PARTIAL_COMPLETION]: true };
  assert.deepEqual(experimentalCapabilities(existing, false), { other: 1 });
  assert.deepEqual(experimentalCapabilities(existing, true), { other: 1, [PARTIAL_COMPLETION]: true });
  assert.deepEqual(existing, { other: 1, [PARTIAL_COMPLETION]: true }); // not modified in place
});
