"""The corpus summary table itself (no AREA: not a hostile case)."""
from __future__ import annotations

from hostile.conftest import tally_table


def test_tally_table_rows_and_total():
    lines = tally_table({"packages": [50, 50], "MQTT/collector": [10, 9]})
    assert [ln.split("|")[0].strip() for ln in lines] == ["area", "MQTT/collector", "packages", "total"]
    assert [int(x) for x in lines[-1].split("|")[1:]] == [60, 59]
