// rt-js: the browser and Node client library for the gateway's protocol (docs/protocol.md).
// Plain ES modules with no dependencies and no build step.

export { Client, RtError, backoffDelay, CLIENT_NAME } from './client.js';
export {
  Kind,
  Codec,
  Flag,
  FrameError,
  CLOSE_NAMES,
  ERROR_NAMES,
  closeAction,
  codecFromName,
  codecName,
  decodeBody,
  decodeFrame,
  deflateRaw,
  encodeBody,
  encodeFrame,
  formatTraceparent,
  inflateRaw,
  isValidRoomId,
  isValidRoute,
  parseTraceparent,
  readError,
  readHeartbeatAck,
  readReconnect,
  readRecovery,
  readWelcome,
  socketIdString,
} from './codec.js';
export * as msgpack from './msgpack.js';
export { FallbackSocket, encodeBatch, decodeBatch, longPollUrl } from './transport.js';
