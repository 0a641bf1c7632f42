//! bitnet-kernels
