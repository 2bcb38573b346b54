#!/usr/bin/env node
// fedtune command-line entry: runs the TypeScript sources through tsx.
import { register } from 'tsx/esm/api';

register();
await import('../cli/main.ts');
