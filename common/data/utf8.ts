/**
 * Dataset files must be UTF-8. Decoding with replacement characters would
 * train on U+FFFD silently, so bytes that are not UTF-8 are refused with the
 * file, line and byte offset. The fast path is TextDecoder with fatal: true;
 * only when it throws does firstInvalidUtf8 walk the bytes to say where
 * (TextDecoder does not tell), following the WHATWG decoder TextDecoder
 * implements (no overlong forms, no surrogates, nothing above U+10FFFF).
 */

const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false });

/** Offset of the first byte that starts an invalid (or cut short) UTF-8 sequence, or -1 when all of `b` is UTF-8. */
export function firstInvalidUtf8(b: Uint8Array): number {
  let i = 0;
  const n = b.length;
  while (i < n) {
    const c = b[i]!;
    if (c < 0x80) {
      i++;
      continue;
    }
    let need: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) need = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      need = 2;
      if (c === 0xe0) lo = 0xa0; // overlong
      if (c === 0xed) hi = 0x9f; // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      need = 3;
      if (c === 0xf0) lo = 0x90; // overlong
      if (c === 0xf4) hi = 0x8f; // above U+10FFFF
    } else return i;
    if (i + need >= n) return i; // cut short by the end of the file
    const second = b[i + 1]!;
    if (second < lo || second > hi) return i;
    for (let k = 2; k <= need; k++) {
      const x = b[i + k]!;
      if (x < 0x80 || x > 0xbf) return i;
    }
    i += need + 1;
  }
  return -1;
}

/** The text of a UTF-8 file (a leading BOM dropped); anything else is an error naming the file, line and byte. */
export function decodeUtf8(bytes: Uint8Array, file: string): string {
  try {
    return decoder.decode(bytes);
  } catch {
    const at = firstInvalidUtf8(bytes);
    if (at < 0) throw new Error(`${file}: not valid UTF-8; dataset files must be UTF-8 text`);
    let line = 1;
    let lineStart = 0;
    for (let i = 0; i < at; i++) {
      if (bytes[i] === 0x0a) {
        line++;
        lineStart = i + 1;
      }
    }
    const hex = Array.from(bytes.subarray(at, Math.min(at + 4, bytes.length)), (x) => x.toString(16).padStart(2, '0')).join(' ');
    throw new Error(
      `${file}:${line}: not valid UTF-8 (bytes ${hex} at byte ${at} of the file, byte ${at - lineStart + 1} of the line); ` +
        `dataset files must be UTF-8 text: convert the file (e.g. iconv -f latin1 -t utf-8) or fix that line`,
    );
  }
}
