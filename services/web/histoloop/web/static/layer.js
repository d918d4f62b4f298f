// Decoding of the overlay payload (see histoloop/web/layer.py for the layout).

const ARRAYS = {
  float32: Float32Array, int8: Int8Array, int16: Int16Array,
  uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array,
};

export function parseLayer(buffer) {
  const view = new DataView(buffer);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== 'HLU1') throw new Error('not an overlay layer (bad magic ' + magic + ')');
  const headerLength = view.getUint32(4, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  let base = 8 + headerLength;
  base += (8 - (base % 8)) % 8;
  const columns = {};
  for (const c of header.columns) {
    const offset = base + c.offset;
    if (c.dtype === 'utf8') {
      const text = new TextDecoder().decode(new Uint8Array(buffer, offset, c.length));
      columns[c.name] = header.n ? text.split('\n') : [];
    } else {
      const Type = ARRAYS[c.dtype];
      columns[c.name] = new Type(buffer, offset, c.length / Type.BYTES_PER_ELEMENT);
    }
  }
  if (!columns.size) columns.size = new Float32Array(header.n).fill(header.size || 1);
  return { ...header, ...columns };
}
