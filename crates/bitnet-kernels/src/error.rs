/// Errors from packing, layout conversion and the BitLinear op.
///
/// Every variant says which input was wrong so that callers (the model loader, the converter)
/// can add the tensor or file name and pass it on to the user.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A ternary matrix had `out` rows not divisible by 4, which the HF packed layout requires.
    #[error("ternary weight has {out} output rows; the packed layout needs a multiple of 4")]
    RowsNotMultipleOfFour { out: usize },
    /// A buffer's length does not match the `[rows, cols]` it was said to have.
    #[error("{what} has {got} elements, expected {expected} for shape {shape:?}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
        shape: [usize; 2],
    },
    /// A value outside −1/0/+1 in a ternary matrix.
    #[error("ternary weight holds {value} at [{row}, {col}]; only -1, 0 and 1 are allowed")]
    NotTernary { row: usize, col: usize, value: i8 },
    /// The 2-bit code 3, which no valid checkpoint contains (0/1/2 mean −1/0/+1).
    #[error("packed weight holds the invalid 2-bit code 3 at packed [{row}, {col}], bits {bit}..{}", bit + 1)]
    InvalidCode { row: usize, col: usize, bit: usize },
    /// An activation whose last dimension does not match the weight's input features.
    #[error(
        "BitLinear input has {got} features in its last dimension, the weight expects {expected}"
    )]
    InputFeatures { got: usize, expected: usize },
    /// The op was given a dtype it cannot compute in.
    #[error("BitLinear supports f32 and bf16 inputs, got {0}")]
    UnsupportedDType(&'static str),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}
