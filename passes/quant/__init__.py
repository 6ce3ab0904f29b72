"""Integer grids: DequantizeLinear products (blocked uint2/uint8) and the opset they need."""
