// A small MessagePack codec (https://github.com/msgpack/msgpack/blob/master/spec.md):
// enough for the protocol's typed bodies and for application bodies. No dependencies.
//
// Mapping:
//   nil <-> null; bool <-> boolean; str <-> string; bin <-> Uint8Array;
//   array <-> Array; map <-> plain object (keys converted to strings; a Map encodes too);
//   int <-> number, or BigInt when the value is outside Number.MAX_SAFE_INTEGER (socket ids
//   and push ids are u64 and must never pass through a float, protocol 11.1);
//   float 32/64 -> number; ext -> { type, data } (never produced by the protocol).
// The encoder writes integers in the smallest form that fits (protocol 6.1), unsigned
// whenever the value is not negative.

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder('utf-8', { fatal: true });

/** Thrown for bytes that are not valid MessagePack or values that cannot be encoded. */
export class MsgpackError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = 'MsgpackError';
  }
}

class Writer {
  constructor() {
    this.buf = new Uint8Array(64);
    this.view = new DataView(this.buf.buffer);
    this.pos = 0;
  }

  /** @param {number} n */
  reserve(n) {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  /** @param {number} b */
  u8(b) {
    this.reserve(1);
    this.buf[this.pos++] = b;
  }

  /** @param {number} tag @param {number} v */
  tagU16(tag, v) {
    this.reserve(3);
    this.buf[this.pos] = tag;
    this.view.setUint16(this.pos + 1, v);
    this.pos += 3;
  }

  /** @param {number} tag @param {number} v */
  tagU32(tag, v) {
    this.reserve(5);
    this.buf[this.pos] = tag;
    this.view.setUint32(this.pos + 1, v);
    this.pos += 5;
  }

  /** @param {Uint8Array} bytes */
  bytes(bytes) {
    this.reserve(bytes.length);
    this.buf.set(bytes, this.pos);
    this.pos += bytes.length;
  }
}

/** @param {Writer} w @param {bigint} v */
function writeBigInt(w, v) {
  if (v >= 0n) {
    if (v <= 0xffffffffn) return writeInt(w, Number(v));
    if (v > 0xffffffffffffffffn) throw new MsgpackError(`integer ${v} exceeds u64`);
    w.reserve(9);
    w.buf[w.pos] = 0xcf;
    w.view.setBigUint64(w.pos + 1, v);
    w.pos += 9;
    return;
  }
  if (v >= -0x80000000n) return writeInt(w, Number(v));
  if (v < -0x8000000000000000n) throw new MsgpackError(`integer ${v} below i64`);
  w.reserve(9);
  w.buf[w.pos] = 0xd3;
  w.view.setBigInt64(w.pos + 1, v);
  w.pos += 9;
}

/** @param {Writer} w @param {number} v a safe integer */
function writeInt(w, v) {
  if (v >= 0) {
    if (v < 0x80) return w.u8(v);
    if (v <= 0xff) {
      w.u8(0xcc);
      return w.u8(v);
    }
    if (v <= 0xffff) return w.tagU16(0xcd, v);
    if (v <= 0xffffffff) return w.tagU32(0xce, v);
    return writeBigInt(w, BigInt(v));
  }
  if (v >= -32) return w.u8(v & 0xff);
  if (v >= -0x80) {
    w.u8(0xd0);
    return w.u8(v & 0xff);
  }
  if (v >= -0x8000) return w.tagU16(0xd1, v & 0xffff);
  if (v >= -0x80000000) return w.tagU32(0xd2, v >>> 0);
  return writeBigInt(w, BigInt(v));
}

/** @param {Writer} w @param {number} len @param {number} fix @param {number} fixMax @param {number} t8 @param {number} t16 @param {number} t32 */
function writeLength(w, len, fix, fixMax, t8, t16, t32) {
  if (len <= fixMax && fix >= 0) return w.u8(fix | len);
  if (len <= 0xff && t8 >= 0) {
    w.u8(t8);
    return w.u8(len);
  }
  if (len <= 0xffff) return w.tagU16(t16, len);
  return w.tagU32(t32, len);
}

/** @param {Writer} w @param {unknown} value @param {number} depth */
function write(w, value, depth) {
  if (depth > 512) throw new MsgpackError('value nested too deeply');
  if (value === null || value === undefined) return w.u8(0xc0);
  switch (typeof value) {
    case 'boolean':
      return w.u8(value ? 0xc3 : 0xc2);
    case 'number':
      if (Number.isSafeInteger(value)) return writeInt(w, value);
      w.reserve(9);
      w.buf[w.pos] = 0xcb;
      w.view.setFloat64(w.pos + 1, value);
      w.pos += 9;
      return;
    case 'bigint':
      return writeBigInt(w, value);
    case 'string': {
      const bytes = textEncoder.encode(value);
      writeLength(w, bytes.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      return w.bytes(bytes);
    }
    default:
      break;
  }
  if (value instanceof Uint8Array || value instanceof ArrayBuffer) {
    const bytes = value instanceof Uint8Array ? value : new Uint8Array(value);
    writeLength(w, bytes.length, -1, -1, 0xc4, 0xc5, 0xc6);
    return w.bytes(bytes);
  }
  if (Array.isArray(value)) {
    writeLength(w, value.length, 0x90, 15, -1, 0xdc, 0xdd);
    for (const item of value) write(w, item, depth + 1);
    return;
  }
  if (typeof value === 'object') {
    // Keys whose value is undefined are left out, as JSON.stringify does. A Map keeps its
    // keys' types (a protocol map always has string keys).
    const all = value instanceof Map ? [...value.entries()] : Object.entries(/** @type {object} */ (value));
    const entries = all.filter(([, v]) => v !== undefined);
    writeLength(w, entries.length, 0x80, 15, -1, 0xde, 0xdf);
    for (const [k, v] of entries) {
      write(w, k, depth + 1);
      write(w, v, depth + 1);
    }
    return;
  }
  throw new MsgpackError(`cannot encode a ${typeof value}`);
}

/**
 * Encodes a value as MessagePack.
 * @param {unknown} value
 * @returns {Uint8Array}
 */
export function encode(value) {
  const w = new Writer();
  write(w, value, 0);
  return w.buf.slice(0, w.pos);
}

class Reader {
  /** @param {Uint8Array} bytes */
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  /** @param {number} n */
  need(n) {
    if (this.pos + n > this.bytes.length) {
      throw new MsgpackError(`truncated: needed ${this.pos + n} bytes, got ${this.bytes.length}`);
    }
    const at = this.pos;
    this.pos += n;
    return at;
  }
}

/** @param {bigint} v @returns {number | bigint} */
function narrow(v) {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= BigInt(Number.MIN_SAFE_INTEGER) ? Number(v) : v;
}

/** @param {Reader} r @param {number} len */
function readStr(r, len) {
  const at = r.need(len);
  try {
    return textDecoder.decode(r.bytes.subarray(at, at + len));
  } catch {
    throw new MsgpackError('invalid UTF-8 in a str');
  }
}

/** @param {Reader} r @param {number} len */
function readBin(r, len) {
  const at = r.need(len);
  return r.bytes.slice(at, at + len);
}

/** @param {Reader} r @param {number} len @param {number} depth */
function readArray(r, len, depth) {
  const out = new Array(len);
  for (let i = 0; i < len; i++) out[i] = read(r, depth + 1);
  return out;
}

/** @param {Reader} r @param {number} len @param {number} depth */
function readMap(r, len, depth) {
  /** @type {Record<string, unknown>} */
  const out = {};
  for (let i = 0; i < len; i++) {
    const key = read(r, depth + 1);
    // defineProperty: a key "__proto__" must become data, not a prototype change.
    Object.defineProperty(out, String(key), {
      value: read(r, depth + 1),
      enumerable: true,
      writable: true,
      configurable: true,
    });
  }
  return out;
}

/** @param {Reader} r @param {number} type @param {number} len */
function readExt(r, type, len) {
  const at = r.need(len);
  return { type: (type << 24) >> 24, data: r.bytes.slice(at, at + len) };
}

/** @param {Reader} r @param {number} depth @returns {unknown} */
function read(r, depth) {
  if (depth > 512) throw new MsgpackError('value nested too deeply');
  const v = r.view;
  const b = r.bytes[r.need(1)];
  if (b < 0x80) return b;
  if (b < 0x90) return readMap(r, b & 0x0f, depth);
  if (b < 0xa0) return readArray(r, b & 0x0f, depth);
  if (b < 0xc0) return readStr(r, b & 0x1f);
  if (b >= 0xe0) return b - 0x100;
  switch (b) {
    case 0xc0:
      return null;
    case 0xc2:
      return false;
    case 0xc3:
      return true;
    case 0xc4:
      return readBin(r, r.bytes[r.need(1)]);
    case 0xc5:
      return readBin(r, v.getUint16(r.need(2)));
    case 0xc6:
      return readBin(r, v.getUint32(r.need(4)));
    case 0xc7: {
      const len = r.bytes[r.need(1)];
      return readExt(r, r.bytes[r.need(1)], len);
    }
    case 0xc8: {
      const len = v.getUint16(r.need(2));
      return readExt(r, r.bytes[r.need(1)], len);
    }
    case 0xc9: {
      const len = v.getUint32(r.need(4));
      return readExt(r, r.bytes[r.need(1)], len);
    }
    case 0xca:
      return v.getFloat32(r.need(4));
    case 0xcb:
      return v.getFloat64(r.need(8));
    case 0xcc:
      return r.bytes[r.need(1)];
    case 0xcd:
      return v.getUint16(r.need(2));
    case 0xce:
      return v.getUint32(r.need(4));
    case 0xcf:
      return narrow(v.getBigUint64(r.need(8)));
    case 0xd0:
      return v.getInt8(r.need(1));
    case 0xd1:
      return v.getInt16(r.need(2));
    case 0xd2:
      return v.getInt32(r.need(4));
    case 0xd3:
      return narrow(v.getBigInt64(r.need(8)));
    case 0xd4:
      return readExt(r, r.bytes[r.need(1)], 1);
    case 0xd5:
      return readExt(r, r.bytes[r.need(1)], 2);
    case 0xd6:
      return readExt(r, r.bytes[r.need(1)], 4);
    case 0xd7:
      return readExt(r, r.bytes[r.need(1)], 8);
    case 0xd8:
      return readExt(r, r.bytes[r.need(1)], 16);
    case 0xd9:
      return readStr(r, r.bytes[r.need(1)]);
    case 0xda:
      return readStr(r, v.getUint16(r.need(2)));
    case 0xdb:
      return readStr(r, v.getUint32(r.need(4)));
    case 0xdc:
      return readArray(r, v.getUint16(r.need(2)), depth);
    case 0xdd:
      return readArray(r, v.getUint32(r.need(4)), depth);
    case 0xde:
      return readMap(r, v.getUint16(r.need(2)), depth);
    case 0xdf:
      return readMap(r, v.getUint32(r.need(4)), depth);
    default:
      // 0xc1 is the one byte the spec never uses.
      throw new MsgpackError(`invalid byte 0x${b.toString(16)} at ${r.pos - 1}`);
  }
}

/**
 * Decodes exactly one MessagePack value; trailing bytes are an error.
 * @param {Uint8Array} bytes
 * @returns {unknown}
 */
export function decode(bytes) {
  const r = new Reader(bytes);
  const value = read(r, 0);
  if (r.pos !== bytes.length) {
    throw new MsgpackError(`${bytes.length - r.pos} trailing bytes after the value`);
  }
  return value;
}
