//! Printing answers: `--output json` prints the API's JSON unchanged (pretty), `table` prints
//! chosen columns aligned. Tables are for people; scripts use JSON, whose field names are the
//! API's and stay stable.

use serde_json::Value;

use super::profile::Output;

/// Prints `value` as JSON, or the `columns` of `rows` as a table.
pub fn print(output: Output, value: &Value, rows: &[Value], columns: &[&str]) {
    match output {
        Output::Json => println!("{}", pretty(value)),
        Output::Table => print!("{}", table(rows, columns)),
    }
}

pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// A cell: strings bare, null empty, arrays joined with commas, the rest as JSON.
pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| cell(Some(i)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// Aligned columns with an upper-case header; cells are cut at 60 characters.
pub fn table(rows: &[Value], columns: &[&str]) -> String {
    const MAX: usize = 60;
    let grid: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| {
                    let s = cell(r.get(*c)).replace(['\n', '\t'], " ");
                    if s.chars().count() > MAX {
                        let cut: String = s.chars().take(MAX - 1).collect();
                        format!("{cut}…")
                    } else {
                        s
                    }
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in &grid {
        for (w, s) in widths.iter_mut().zip(row) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}", w = *w))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect(), &mut out);
    for row in grid {
        line(row, &mut out);
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_and_join() {
        let rows = vec![
            json!({"jti": "a", "tools": ["x", "y"], "n": 3}),
            json!({"jti": "longer", "tools": null}),
        ];
        let t = table(&rows, &["jti", "tools", "n"]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "JTI     TOOLS  N");
        assert_eq!(lines[1], "a       x,y    3");
        assert_eq!(lines[2], "longer");
        assert_eq!(table(&[], &["a"]), "A\n(none)\n");
    }
}
