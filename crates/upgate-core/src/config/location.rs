//! Locations in the config text: where a nested key is, for errors that name file:line:col.

/// Finds the line and column of a nested block-style key (`tenants` > `demo` > `plan`) in
/// YAML text; falls back to the deepest key found. 1-based.
pub(super) fn locate(text: &str, keys: &[&str]) -> (usize, usize) {
    let mut best = (1, 1);
    let mut depth = 0;
    let mut parent_indent: Option<usize> = None;
    for (number, line) in text.lines().enumerate() {
        if depth == keys.len() {
            break;
        }
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if parent_indent.is_some_and(|parent| indent <= parent) {
            // Left the parent's block without finding the key.
            break;
        }
        let key = trimmed
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(['"', '\'']);
        if key == keys[depth] && trimmed.contains(':') {
            best = (number + 1, indent + 1);
            parent_indent = Some(indent);
            depth += 1;
            // Flow style (`demo: { plan: x }`): the rest is on this line.
            if let Some(rest_keys) = keys.get(depth..) {
                let mut column = indent + key.len();
                for rest in rest_keys {
                    // `column` counts the key without its quotes: it may fall inside a
                    // character of a quoted non-ASCII key, where slicing would panic.
                    if let Some(found) = line.get(column..).and_then(|tail| tail.find(&format!("{rest}:"))) {
                        column += found;
                        best = (number + 1, column + 1);
                        depth += 1;
                    } else {
                        break;
                    }
                }
            }
        }
    }
    best
}
