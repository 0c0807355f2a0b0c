//! Aligned plain-text tables for the command-line tools (`dcvsm`'s table
//! output, `dcv-broker clients list`): one look for both, measured by
//! display width so that names in any script keep the columns lined up.

use comfy_table::{Table, presets::NOTHING};

/// `rows` under `header`, columns separated by two spaces, no trailing
/// spaces, ending in a newline.
pub fn aligned<H, R, C>(header: H, rows: impl IntoIterator<Item = R>) -> String
where
    H: IntoIterator,
    H::Item: Into<comfy_table::Cell>,
    R: IntoIterator<Item = C>,
    C: Into<comfy_table::Cell>,
{
    let mut grid = Table::new();
    grid.load_style(NOTHING).set_header(header);
    for row in rows {
        grid.add_row(row);
    }
    for column in grid.column_iter_mut() {
        column.set_padding((0, 2));
    }
    grid.trim_fmt() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_by_display_width() {
        // "東京" is four columns wide, as wide as "NAME".
        assert_eq!(
            aligned(["NAME", "CITY"], [["東京", "x"], ["abcdef", "y"]]),
            "NAME    CITY\n東京    x\nabcdef  y\n"
        );
    }
}
