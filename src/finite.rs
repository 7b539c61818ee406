//! Non-finite numbers: a run that diverged fails with an error of its own type ([`Diverged`],
//! which `main` gives its own exit code) and never writes a non-finite adapter.

use anyhow::Result;

/// The error of a diverged run: no finite step, too many non-finite steps in a row, or a
/// non-finite adapter. `main` finds it with [`is_diverged`].
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

/// A [`Diverged`] error with `msg`.
pub fn diverged(msg: String) -> anyhow::Error {
    Diverged(msg).into()
}

/// Whether `e` (or an error it wraps) is a [`Diverged`].
pub fn is_diverged(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Diverged>())
}

/// Fails when none of the `steps` optimizer steps so far was finite (all `skipped`).
pub fn ensure_some_finite_step(skipped: usize, steps: usize) -> Result<()> {
    if steps > 0 && skipped >= steps {
        return Err(diverged(format!(
            "all {steps} steps had a non-finite loss or gradient and were skipped: the adapter was never updated (lower train.learning_rate, check the data)"
        )));
    }
    Ok(())
}

/// Fails when any of `values` (the tensor `name` of an adapter about to be written) is NaN or
/// infinite.
pub fn ensure_finite(name: &str, values: &[f32]) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(diverged(format!(
            "tensor `{name}` holds a non-finite value ({} at index {i}): the run diverged and this adapter is not written (lower train.learning_rate)",
            values[i]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverged_is_found_through_context() {
        let e = ensure_finite("a", &[1.0, f32::NAN]).unwrap_err();
        let e = e.context("writing checkpoint-3");
        assert!(is_diverged(&e));
        assert!(!is_diverged(&anyhow::anyhow!("other")));
        assert!(ensure_some_finite_step(3, 3).is_err());
        assert!(ensure_some_finite_step(2, 3).is_ok());
    }
}
