//! bitnet-model
