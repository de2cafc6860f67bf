//! Chunked transfer: splitting large payloads and reassembling them with bounded memory.
