"""Spot prices from EC2's spot price history.

Prices are USD per instance-hour for Linux/UNIX. The API returns prices as strings, so
they are compared as numbers after conversion, never as text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from mgutil.errors import SpotPriceTooLowError

logger = logging.getLogger(__name__)

PRODUCT_DESCRIPTION = "Linux/UNIX"
HISTORY_COLUMNS = ["timestamp", "availability_zone", "instance_type", "price_usd"]


def spot_price_history(
    ec2, instance_types: str | list[str], start: datetime, end: datetime | None = None
) -> pd.DataFrame:
    """Return every spot price record in ``[start, end]``, all pages, oldest first.

    Args:
        ec2: A boto3 EC2 client.
        instance_types: One instance type or several.
        start: Earliest time, timezone-aware.
        end: Latest time; now when ``None``.

    Returns:
        Columns ``timestamp`` (UTC), ``availability_zone``, ``instance_type`` and
        ``price_usd`` (float).
    """
    if isinstance(instance_types, str):
        instance_types = [instance_types]
    end = end or datetime.now(UTC)
    paginator = ec2.get_paginator("describe_spot_price_history")
    rows = []
    pages = paginator.paginate(
        InstanceTypes=list(instance_types),
        ProductDescriptions=[PRODUCT_DESCRIPTION],
        StartTime=start,
        EndTime=end,
    )
    for page in pages:
        for item in page.get("SpotPriceHistory", []):
            rows.append(
                {
                    "timestamp": pd.Timestamp(item["Timestamp"]).tz_convert("UTC"),
                    "availability_zone": item["AvailabilityZone"],
                    "instance_type": item["InstanceType"],
                    "price_usd": float(item["SpotPrice"]),
                }
            )
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    if frame.empty:
        return frame
    return frame.sort_values(["timestamp", "availability_zone"], kind="stable").reset_index(
        drop=True
    )


def latest_prices(history: pd.DataFrame) -> pd.DataFrame:
    """Return the latest record of each zone in ``history``, cheapest first.

    Returns:
        Columns ``availability_zone``, ``price_usd`` and ``timestamp`` of the record.
    """
    if history.empty:
        return pd.DataFrame(columns=["availability_zone", "price_usd", "timestamp"])
    latest = (
        history.sort_values("timestamp", kind="stable")
        .groupby("availability_zone", as_index=False)
        .last()
    )
    latest = latest[["availability_zone", "price_usd", "timestamp"]]
    return latest.sort_values(["price_usd", "availability_zone"], kind="stable").reset_index(
        drop=True
    )


def current_spot_prices(
    ec2, instance_type: str, lookback: timedelta = timedelta(days=1)
) -> pd.DataFrame:
    """Return the latest spot price per availability zone, cheapest first.

    EC2 records a price only when it changes, so the latest record of each zone within
    ``lookback`` is its current price. A zone with no record in that span is left out.

    Returns:
        Columns ``availability_zone``, ``price_usd`` and ``timestamp`` of the record.
    """
    history = spot_price_history(ec2, instance_type, datetime.now(UTC) - lookback)
    return latest_prices(history)


@dataclass(frozen=True)
class PriceSummary:
    """Current prices against the maximum. Prices in USD per instance-hour.

    Attributes:
        instance_type: The instance type priced.
        max_price_usd: The configured maximum spot price.
        current: Latest price per zone, cheapest first (see :func:`latest_prices`).
    """

    instance_type: str
    max_price_usd: float
    current: pd.DataFrame

    @property
    def cheapest_zone(self) -> str | None:
        return None if self.current.empty else str(self.current.iloc[0]["availability_zone"])

    @property
    def cheapest_price_usd(self) -> float | None:
        return None if self.current.empty else float(self.current.iloc[0]["price_usd"])

    @property
    def zones_within_max(self) -> list[str]:
        """Zones whose current price is at or below the maximum."""
        within = self.current[self.current["price_usd"] <= self.max_price_usd]
        return [str(zone) for zone in within["availability_zone"]]

    def table(self) -> pd.DataFrame:
        """The per-zone table with the maximum beside each price, for display."""
        table = self.current.copy()
        table["max_price_usd"] = self.max_price_usd
        table["within_max"] = table["price_usd"] <= self.max_price_usd
        return table

    def check_max_price(self) -> None:
        """Refuse a maximum price below every zone's current price.

        Raises:
            SpotPriceTooLowError: No zone has a price at or below the maximum, so a
                request would only wait in ``price-too-low``. Also raised when no price
                is known for the instance type.
        """
        if self.current.empty:
            raise SpotPriceTooLowError(
                f"no Linux/UNIX spot price is known for {self.instance_type} in this region; "
                "check the instance type (INSTANCE_TYPE) and the region (AWS_REGION)"
            )
        if not self.zones_within_max:
            raise SpotPriceTooLowError(
                f"the maximum spot price ${self.max_price_usd:.4f}/h is below the current "
                f"{self.instance_type} price in every zone (cheapest: {self.cheapest_zone} at "
                f"${self.cheapest_price_usd:.4f}/h); raise MAX_SPOT_PRICE_USD or "
                "-p max_spot_price_usd, or try another instance type"
            )


def summarize_prices(
    history: pd.DataFrame, instance_type: str, max_price_usd: float
) -> PriceSummary:
    """Build a :class:`PriceSummary` from a price history of one instance type."""
    return PriceSummary(instance_type, float(max_price_usd), latest_prices(history))


def price_chart(
    history: pd.DataFrame,
    max_price_usd: float,
    path: str | Path | None = None,
    end: datetime | None = None,
    days: float = 7.0,
    title: str | None = None,
):
    """Draw the spot price of each zone over the last ``days`` days, with the maximum.

    EC2 records a price when it changes, so each zone is drawn as steps, and a record
    from before the window sets the price at the window's start.

    Args:
        history: Records as returned by :func:`spot_price_history`.
        max_price_usd: Drawn as a horizontal line, USD per hour.
        path: When set, the PNG is written there (folders created).
        end: Right edge of the chart; now when ``None``.
        days: Width of the chart in days.
        title: Chart title; a default names the instance type.

    Returns:
        The matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    end = end or datetime.now(UTC)
    start = end - timedelta(days=days)
    figure = Figure(figsize=(9, 4), layout="constrained")
    axes = figure.subplots()
    for zone, records in history.groupby("availability_zone"):
        records = records.sort_values("timestamp")
        times = [max(ts.to_pydatetime(), start) for ts in records["timestamp"]]
        prices = list(records["price_usd"])
        # Keep the last record at or before the window start, and every later one.
        keep = [i for i, ts in enumerate(times) if i + 1 == len(times) or times[i + 1] > start]
        times = [times[i] for i in keep] + [end]
        prices = [prices[i] for i in keep] + [prices[keep[-1]]]
        axes.step(times, prices, where="post", label=str(zone))
    axes.axhline(max_price_usd, color="red", linestyle="--", label=f"maximum ${max_price_usd:.3f}")
    axes.set_xlim(start, end)
    axes.set_ylim(bottom=0)
    axes.set_ylabel("USD per hour")
    instance_types = sorted(set(history["instance_type"])) if not history.empty else []
    axes.set_title(title or f"Spot price, last {days:g} days: {', '.join(instance_types)}")
    axes.legend(loc="upper left", fontsize="small", ncols=2)
    figure.autofmt_xdate()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        logger.info("saved the spot price chart to %s", path)
    return figure
