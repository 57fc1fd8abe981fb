"""Spot prices from EC2's spot price history.

Prices are USD per instance-hour for Linux/UNIX. The API returns prices as strings, so
they are compared as numbers after conversion, never as text.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pandas as pd

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
    if history.empty:
        return pd.DataFrame(columns=["availability_zone", "price_usd", "timestamp"])
    latest = history.sort_values("timestamp").groupby("availability_zone", as_index=False).last()
    latest = latest[["availability_zone", "price_usd", "timestamp"]]
    return latest.sort_values(["price_usd", "availability_zone"], kind="stable").reset_index(
        drop=True
    )
