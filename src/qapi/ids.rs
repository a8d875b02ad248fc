//! QEMU's rule for the ids a user gives (job ids, node names, device
//! names): `id_wellformed`.

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::id_wellformed;

    #[test]
    fn ids_as_qemu() {
        assert!(id_wellformed("a"));
        assert!(id_wellformed("job-0.x_y"));
        assert!(!id_wellformed(""));
        assert!(!id_wellformed("0job"));
        assert!(!id_wellformed("#block1"));
        assert!(!id_wellformed("a b"));
        assert!(!id_wellformed("é"));
    }
}
