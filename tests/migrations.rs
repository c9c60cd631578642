//! Expand/contract (docs/UPGRADING.md): a migration runs while the previous release's processes
//! still run on the database, so it may only expand what that release uses. This test reads
//! every migration newer than the previous release's and fails on a statement that can break
//! the previous release's queries or writes (dropping or renaming a table, column, type, view
//! or function; changing a column's type; making a column NOT NULL; adding a constraint or a
//! unique index its writes might violate), unless the migration says, in a line starting with
//! `-- compatible:`, why the previous release is not affected. The upgrade scenarios
//! (tests/upgrade.rs) then run the previous release on the migrated schema for real.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

/// The last migration of the previous release (scripts/previous-release.sh's pin); move both
/// together.
const PREVIOUS_RELEASE_LAST_MIGRATION: i64 = 20261201000105;

/// Statements that can break a release still running on the schema, as (what, pattern).
const RISKY: &[(&str, &str)] = &[
    ("drops a table", r"(?i)\bdrop\s+table\b"),
    ("drops a column", r"(?i)\bdrop\s+column\b"),
    ("renames something", r"(?i)\brename\s+(to|column|constraint)\b"),
    (
        "changes a column's type",
        r"(?i)\balter\s+column\s+\S+\s+(set\s+data\s+)?type\b",
    ),
    ("makes a column NOT NULL", r"(?i)\bset\s+not\s+null\b"),
    ("adds a constraint", r"(?i)\badd\s+constraint\b"),
    ("adds a unique index", r"(?i)\bcreate\s+unique\s+index\b"),
    (
        "drops a type, view or function",
        r"(?i)\bdrop\s+(type|view|function|materialized\s+view)\b",
    ),
];

fn without_comments(sql: &str) -> String {
    sql.lines()
        .map(|l| l.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What is risky in `sql` and not explained by a `-- compatible:` line.
fn unexplained(sql: &str) -> Vec<&'static str> {
    if sql.lines().any(|l| l.trim_start().starts_with("-- compatible:")) {
        return Vec::new();
    }
    let code = without_comments(sql);
    let mut found: Vec<&'static str> = RISKY
        .iter()
        .filter(|(_, pattern)| regex::Regex::new(pattern).unwrap().is_match(&code))
        .map(|(what, _)| *what)
        .collect();
    // A NOT NULL column without a default: the previous release's inserts do not set it.
    let add_column = regex::Regex::new(r"(?i)\badd\s+column\b").unwrap();
    let lower = code.to_lowercase();
    if lower
        .split([',', ';'])
        .any(|clause| add_column.is_match(clause) && clause.contains("not null") && !clause.contains("default"))
    {
        found.push("adds a NOT NULL column without a default");
    }
    found
}

#[test]
fn migrations_since_the_previous_release_only_expand_the_schema() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version <= PREVIOUS_RELEASE_LAST_MIGRATION {
            continue;
        }
        checked += 1;
        let risky = unexplained(&std::fs::read_to_string(&path).unwrap());
        assert!(
            risky.is_empty(),
            "{name} {risky:?}: the previous release may still run on this schema; split it (expand now, contract a release later) or say why it is safe in a `-- compatible:` line"
        );
    }
    assert!(
        checked > 0,
        "no migration since the previous release: move PREVIOUS_RELEASE_LAST_MIGRATION with the pin"
    );
}

#[test]
fn the_check_finds_what_breaks_a_running_release() {
    for breaking in [
        "ALTER TABLE orders DROP COLUMN reason;",
        "ALTER TABLE orders RENAME COLUMN reason TO why;",
        "ALTER TABLE orders ALTER COLUMN total_amount TYPE numeric;",
        "ALTER TABLE orders ALTER COLUMN reason SET NOT NULL;",
        "ALTER TABLE orders ADD COLUMN region text NOT NULL;",
        "ALTER TABLE confirmed_events ADD CONSTRAINT ms CHECK (confirmed_at = date_trunc('milliseconds', confirmed_at));",
        "CREATE UNIQUE INDEX one_per_user ON orders (user_id);",
        "DROP TABLE product_sales_hourly;",
    ] {
        assert!(!unexplained(breaking).is_empty(), "{breaking}");
    }
    for fine in [
        "ALTER TABLE orders ADD COLUMN region text;",
        "ALTER TABLE orders ADD COLUMN tries int NOT NULL DEFAULT 0, ADD COLUMN note text;",
        "CREATE INDEX orders_region_idx ON orders (region);",
        "UPDATE confirmed_events SET confirmed_at = date_trunc('milliseconds', confirmed_at);",
        "-- DROP TABLE in a comment\nSELECT 1;",
        "-- compatible: the previous release never reads this column\nALTER TABLE orders DROP COLUMN old_note;",
    ] {
        assert!(unexplained(fine).is_empty(), "{fine}");
    }
}
