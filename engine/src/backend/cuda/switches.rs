//! The CUDA backend's diagnostic switches (`RVLLM_*` environment variables that pick between
//! kernels for same-binary A/B runs): each takes one of a fixed set of values, and anything
//! else is an error that lists them, so that a mistyped A/B never silently measures the
//! default twice.

use anyhow::{bail, Result};

/// The value of switch `name` among `choices` (value, meaning); the first choice is the
/// default, taken when the variable is unset or empty.
pub fn switch<T: Copy>(name: &str, choices: &[(&str, T)]) -> Result<T> {
    parse(name, std::env::var(name).ok().as_deref(), choices)
}

fn parse<T: Copy>(name: &str, value: Option<&str>, choices: &[(&str, T)]) -> Result<T> {
    let value = value.map(str::trim).unwrap_or("");
    let Some(&(default_name, default)) = choices.first() else {
        bail!("{name}: no values defined (a bug)");
    };
    if value.is_empty() {
        return Ok(default);
    }
    if let Some(&(_, meaning)) = choices.iter().find(|(v, _)| *v == value) {
        return Ok(meaning);
    }
    let others: Vec<&str> = choices[1..].iter().map(|(v, _)| *v).collect();
    bail!(
        "{name}={value}: use {default_name} (the default) or {}",
        others.join(" or ")
    )
}

#[cfg(test)]
mod tests {
    use super::parse;

    const CHOICES: &[(&str, usize)] = &[("4", 4), ("6", 6)];

    #[test]
    fn unset_or_blank_is_the_first_choice() {
        assert_eq!(parse("RVLLM_X", None, CHOICES).unwrap(), 4);
        assert_eq!(parse("RVLLM_X", Some("  "), CHOICES).unwrap(), 4);
        assert_eq!(parse("RVLLM_X", Some(" 6 "), CHOICES).unwrap(), 6);
        assert_eq!(parse("RVLLM_X", Some("4"), CHOICES).unwrap(), 4);
    }

    #[test]
    fn other_values_are_errors_that_list_the_choices() {
        let e = parse("RVLLM_X", Some("5"), CHOICES)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "RVLLM_X=5: use 4 (the default) or 6");
        let three = &[("kernel", 0), ("fold", 1), ("other", 2)];
        let e = parse("RVLLM_Y", Some("x"), three).unwrap_err().to_string();
        assert_eq!(e, "RVLLM_Y=x: use kernel (the default) or fold or other");
    }
}
