//! [`BitLinear`]: a ternary linear layer as a candle [`Module`], usable by any candle model.
//!
//! It wraps the kernel crate's [`BitLinearOp`] (per-token int8 activations, exact integer
//! product with −1/0/+1 weights, one rescale per output) and knows how to build itself from the
//! two on-disk formats: packed U8 + `weight_scale` ("offline") and float master weights that are
//! quantized when loaded ("online", transformers' `WeightQuant`).

use std::sync::Arc;

use bitnet_kernels::pack::quantize_absmean;
use bitnet_kernels::{BitLinearOp, KernelError, ScaleConvention, TernaryWeight};
use candle_core::{DType, Module, Tensor};
use safetensors::Dtype;

use crate::error::Result;
use crate::weights::{TensorRef, Weights};

/// A BitNet b1.58 linear layer `[..., in] → [..., out]` (no bias).
#[derive(Clone, Debug)]
pub struct BitLinear {
    op: BitLinearOp,
}

impl BitLinear {
    /// From a HF packed U8 `[out/4, in]` buffer and the checkpoint's `weight_scale`.
    pub fn from_packed(
        packed: &[u8],
        out: usize,
        inp: usize,
        scale: f32,
        convention: ScaleConvention,
    ) -> std::result::Result<Self, KernelError> {
        let w = TernaryWeight::from_hf_packed(packed, out, inp)?;
        Ok(Self::from_weight(Arc::new(w), scale, convention))
    }

    /// From a row-major ternary `[out, in]` matrix (values −1/0/+1) and its scale.
    pub fn from_ternary(
        ternary: &[i8],
        out: usize,
        inp: usize,
        scale: f32,
        convention: ScaleConvention,
    ) -> std::result::Result<Self, KernelError> {
        let w = TernaryWeight::from_ternary(ternary, out, inp)?;
        Ok(Self::from_weight(Arc::new(w), scale, convention))
    }

    /// From float master weights `[out, in]`, quantized as transformers' online `WeightQuant`
    /// does: `T = clamp(round(W / mean|W|), −1, 1)`, scale `mean|W|` (multiplied).
    ///
    /// transformers then stores `T · scale` in the model dtype, so in a bf16 model every weight
    /// is `T · bf16(scale)`; `model_dtype` = BF16 mirrors that by rounding the scale to bf16.
    pub fn from_float(
        weights: &[f32],
        out: usize,
        inp: usize,
        model_dtype: DType,
    ) -> std::result::Result<Self, KernelError> {
        let (ternary, scale) = quantize_absmean(weights);
        let scale = round_to(scale, model_dtype);
        Self::from_ternary(&ternary, out, inp, scale, ScaleConvention::Multiply)
    }

    /// From an already built kernel weight (shared between layers if needed).
    pub fn from_weight(
        weight: Arc<TernaryWeight>,
        scale: f32,
        convention: ScaleConvention,
    ) -> Self {
        Self {
            op: BitLinearOp::new(weight, scale, convention),
        }
    }

    /// The underlying op (weight, scale and convention).
    pub fn op(&self) -> &BitLinearOp {
        &self.op
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.op.weight().in_features()
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.op.weight().out_features()
    }

    /// True when every ternary weight is zero, the sign of a broken checkpoint.
    pub fn is_all_zero(&self) -> bool {
        self.op.weight().is_all_zero()
    }
}

impl Module for BitLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.op.forward(xs)
    }
}

/// `x` rounded to the precision of `dtype` (bf16 or f16), unchanged for f32.
fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// How [`load`] found a linear stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Packed U8 + `weight_scale`.
    Packed,
    /// Float weights, quantized at load.
    Float,
}

/// Loads the BitLinear `name` (e.g. `model.layers.0.mlp.up_proj.weight`) of shape `[out, in]`.
///
/// The tensor's dtype decides the format: U8 `[out/4, in]` is packed and needs
/// `<name>_scale`; a float `[out, in]` is quantized here. Anything else is an error naming the
/// tensor, its file and both accepted layouts.
pub(crate) fn load(
    weights: &Weights,
    name: &str,
    out: usize,
    inp: usize,
    convention: ScaleConvention,
    model_dtype: DType,
) -> Result<(BitLinear, Stored)> {
    let t = weights.get(name)?;
    let expected = || {
        if out.is_multiple_of(4) {
            format!("U8 [{}, {inp}] (packed) or a float [{out}, {inp}]", out / 4)
        } else {
            format!("a float [{out}, {inp}] ({out} rows cannot be packed 4 to a byte)")
        }
    };
    let kernel = |e: KernelError| t.bad(e.to_string());
    if t.dtype == Dtype::U8 && out.is_multiple_of(4) && t.shape == [out / 4, inp] {
        let scale_name = format!("{name}_scale");
        let scale = read_scale(weights, &scale_name, &t)?;
        let layer = BitLinear::from_packed(t.data, out, inp, scale, convention).map_err(kernel)?;
        Ok((layer, Stored::Packed))
    } else if t.is_float() && t.shape == [out, inp] {
        let w = t.to_f32_vec(&[out, inp])?;
        let layer = BitLinear::from_float(&w, out, inp, model_dtype).map_err(kernel)?;
        Ok((layer, Stored::Float))
    } else {
        Err(t.mismatch(expected()))
    }
}

/// Reads the one-element `weight_scale` of packed weight `w`; it must be finite and positive.
fn read_scale(weights: &Weights, name: &str, w: &TensorRef<'_>) -> Result<f32> {
    let hint = format!(
        "; packed weight {} needs its scale (quantization_mode \"offline\")",
        w.name
    );
    let s = weights.get_or(name, &hint)?;
    if !s.is_float() || s.elem_count() != 1 {
        return Err(s.mismatch("a float [1]"));
    }
    let v = s.to_f32_vec(s.shape)?[0];
    if !(v.is_finite() && v > 0.0) {
        return Err(s.bad(format!(
            "weight_scale is {v}; expected a positive finite number"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn module_matches_reference_math() {
        // W = [[1, 0, -1], [0, 1, 1], [-1, -1, 0], [1, 1, 1]], scale 0.5 (multiply).
        let t: Vec<i8> = vec![1, 0, -1, 0, 1, 1, -1, -1, 0, 1, 1, 1];
        let lin = BitLinear::from_ternary(&t, 4, 3, 0.5, ScaleConvention::Multiply).unwrap();
        let x = Tensor::new(&[[0.5f32, -1.0, 0.25]], &Device::Cpu).unwrap();
        let y = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        // s = 127, q = [64 (63.5 ties to even), -127, 32 (31.75)].
        let q = [64.0f32, -127.0, 32.0];
        for (o, row) in t.chunks(3).enumerate() {
            let acc: f32 = row.iter().zip(q).map(|(&w, q)| w as f32 * q).sum();
            assert!(
                (y[0][o] - acc / 127.0 * 0.5).abs() < 1e-6,
                "{o}: {}",
                y[0][o]
            );
        }
    }

    #[test]
    fn online_scale_rounds_to_model_dtype() {
        let w: Vec<f32> = (0..32)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.0123)
            .collect();
        let f32_layer = BitLinear::from_float(&w, 4, 8, DType::F32).unwrap();
        let bf16_layer = BitLinear::from_float(&w, 4, 8, DType::BF16).unwrap();
        let (s32, c) = f32_layer.op().scale();
        let (s16, _) = bf16_layer.op().scale();
        assert_eq!(c, ScaleConvention::Multiply);
        assert_eq!(s16, half::bf16::from_f32(s32).to_f32());
        assert_eq!(
            f32_layer.op().weight().to_ternary(),
            bf16_layer.op().weight().to_ternary()
        );
    }
}
