//! Test helpers: the CPU backends, tensor builders, tolerant comparisons and fixture loading.

use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

/// Plain CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;
/// CPU backend with autodiff, for gradient checks.
pub type Ad = burn::backend::Autodiff<Cpu>;

/// 1-D tensor from values.
pub fn t1<B: burn::tensor::backend::Backend>(v: &[f32]) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}

/// 2-D tensor from rows.
pub fn t2<B: burn::tensor::backend::Backend>(rows: &[Vec<f32>]) -> Tensor<B, 2> {
    let r = rows.len();
    let c = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [r, c]), &Default::default())
}

/// Reads a tensor back as f64 values.
pub fn vals<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// `|a - e| <= 1e-5 * (1 + |e|)`, NaN only equal to NaN.
pub fn close(a: f64, e: f64) -> bool {
    if e.is_nan() || a.is_nan() {
        return e.is_nan() && a.is_nan();
    }
    (a - e).abs() <= 1e-5 * (1.0 + e.abs())
}

#[track_caller]
pub fn assert_close(what: &str, actual: f64, expected: f64) {
    assert!(
        close(actual, expected),
        "{what}: got {actual}, expected {expected} (diff {})",
        (actual - expected).abs()
    );
}

#[track_caller]
pub fn assert_all_close(what: &str, actual: &[f64], expected: &[f64]) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: got {} values, expected {}",
        actual.len(),
        expected.len()
    );
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            close(*a, *e),
            "{what}[{i}]: got {a}, expected {e} (diff {})",
            (a - e).abs()
        );
    }
}

/// Loads `tests/fixtures/trl/<name>` at the repository root (or from `$RLHF_TRL_FIXTURES`).
pub fn fixture(name: &str) -> Value {
    let dir = std::env::var("RLHF_TRL_FIXTURES").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/trl").to_string()
    });
    let path = format!("{dir}/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read TRL fixture {path}: {e}; generate it with scripts/fixtures/trl_losses.py \
             and scripts/fixtures/ppo_numpy.py --out tests/fixtures/trl"
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {path} is not JSON: {e}"))
}

/// A JSON number (null -> NaN).
pub fn num(v: &Value) -> f64 {
    match v {
        Value::Null => f64::NAN,
        Value::Bool(b) => f64::from(u8::from(*b)),
        _ => v
            .as_f64()
            .unwrap_or_else(|| panic!("expected a number, got {v}")),
    }
}

/// A JSON array of numbers (null -> NaN).
pub fn nums(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(num)
        .collect()
}

/// A JSON array of numbers as f32.
pub fn f32s(v: &Value) -> Vec<f32> {
    nums(v).into_iter().map(|x| x as f32).collect()
}

/// A JSON matrix as f32 rows.
pub fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a matrix, got {v}"))
        .iter()
        .map(f32s)
        .collect()
}

/// A JSON matrix flattened to f64.
pub fn flat(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a matrix, got {v}"))
        .iter()
        .flat_map(nums)
        .collect()
}
