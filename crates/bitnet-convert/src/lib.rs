//! bitnet-convert
