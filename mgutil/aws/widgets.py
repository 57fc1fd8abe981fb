"""ipywidgets confirmation panels for the launch notebook.

A panel shows a summary and a warning, a checkbox that acknowledges the warning, and a
button that stays disabled until the box is ticked. A click runs the action and shows
its result (or its error) in the panel. The callbacks are plain methods, so tests can
drive a panel without a browser: set ``panel.checkbox.value = True`` and call
``panel.button.click()``.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable

import pandas as pd

logger = logging.getLogger(__name__)

BILLING_WARNING = (
    "The instance keeps billing until it is shut down, unless auto-shutdown is on; "
    "the hard cap stops it after {minutes} minute(s) at the latest."
)


class ConfirmPanel:
    """A summary, an acknowledgement checkbox and an action button.

    Args:
        title: Heading of the panel.
        summary: Rows to show, as a DataFrame or a list of ``(item, value)`` pairs.
        warning: Text the user acknowledges; shown in bold.
        acknowledgement: Label of the checkbox.
        button_label: Label of the button.
        action: Called without arguments on click; its return value is displayed.
    """

    def __init__(
        self,
        title: str,
        summary,
        warning: str,
        acknowledgement: str,
        button_label: str,
        action: Callable[[], object],
    ):
        import ipywidgets as widgets

        self.action = action
        self.result: object = None
        self.error: Exception | None = None
        self.clicks = 0
        self.heading = widgets.HTML(f"<h3>{html.escape(title)}</h3>")
        self.summary = widgets.HTML(_summary_html(summary))
        self.warning = widgets.HTML(f"<p><b>{html.escape(warning)}</b></p>")
        self.checkbox = widgets.Checkbox(
            value=False, description=acknowledgement, indent=False, layout={"width": "auto"}
        )
        self.button = widgets.Button(
            description=button_label, disabled=True, button_style="danger", icon="play"
        )
        self.output = widgets.Output()
        self.checkbox.observe(self._on_acknowledge, names="value")
        self.button.on_click(self._on_click)
        self.widget = widgets.VBox(
            [self.heading, self.summary, self.warning, self.checkbox, self.button, self.output]
        )
        self.widget.add_class("musicgen-confirm-panel")

    def _on_acknowledge(self, change) -> None:
        self.button.disabled = not change["new"]

    def _on_click(self, _button) -> None:
        if not self.checkbox.value:
            # The button is disabled while unticked; a click that gets here anyway does nothing.
            return
        self.clicks += 1
        self.button.disabled = True
        self.checkbox.disabled = True
        self.output.clear_output()
        with self.output:
            from IPython.display import display

            try:
                self.result = self.action()
            except Exception as error:  # shown in the panel, where the user looks
                self.error = error
                logger.exception("%s failed", self.button.description)
                display(_error_html(error))
                # Let the user try again after fixing the cause.
                self.checkbox.disabled = False
                self.checkbox.value = False
                return
            display(_result_display(self.result))

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _summary_html(summary) -> str:
    rows = summary.itertuples(index=False) if isinstance(summary, pd.DataFrame) else summary
    cells = "".join(
        f"<tr><td>{html.escape(str(item))}</td><td><code>{html.escape(str(value))}</code></td></tr>"
        for item, value in rows
    )
    return f"<table>{cells}</table>"


def _error_html(error: Exception):
    from IPython.display import HTML

    return HTML(
        f"<pre style='color: #b00'>{html.escape(type(error).__name__)}: "
        f"{html.escape(str(error))}</pre>"
    )


def _result_display(result):
    from IPython.display import HTML

    table = getattr(result, "table", None)
    if callable(table):
        return table()
    line = getattr(result, "line", None)
    if callable(line):
        return HTML(f"<p>{html.escape(line())}</p>")
    return result


def launch_panel(plan, estimate_usd: float | None, action: Callable[[], object]) -> ConfirmPanel:
    """Build the launch panel for a :class:`mgutil.aws.launch.LaunchPlan`.

    Args:
        plan: The launch plan; its summary is shown.
        estimate_usd: Estimated cost of the job file at the maximum price, USD.
        action: Launches; called once per confirmed click.
    """
    count = getattr(plan, "count", 1)
    if count > 1:
        placement = [
            ("workers", f"{count}, as one EC2 Fleet request"),
            ("instance types", ", ".join(plan.fleet_instance_types)),
        ]
    else:
        placement = [
            ("instance type", plan.instance_type),
            ("availability zone", plan.zone or "chosen by EC2"),
        ]
    rows = [
        *placement,
        ("maximum spot price (USD/h)", f"{plan.max_price_usd:g}"),
        (
            "estimated cost (USD, at the maximum)",
            "unknown" if estimate_usd is None else f"{estimate_usd:.2f}",
        ),
        ("auto-shutdown", "on" if plan.bootstrap.auto_shutdown else "OFF"),
        ("run id", plan.run_id),
    ]
    return ConfirmPanel(
        title="Launch a spot GPU worker",
        summary=rows,
        warning=BILLING_WARNING.format(minutes=plan.bootstrap.max_runtime_minutes),
        acknowledgement="I understand that this instance bills until it is shut down"
        if count == 1
        else f"I understand that these {count} instances bill until they are shut down",
        button_label="Launch",
        action=action,
    )


def shutdown_panel(workers, action: Callable[[], object]) -> ConfirmPanel:
    """Build the shutdown panel for the tagged workers found (a :class:`Workers`)."""
    rows = [(f"instance {row.instance_id}", row.state) for row in workers.instances.itertuples()]
    rows += [
        (f"spot request {row.spot_request_id}", row.state) for row in workers.requests.itertuples()
    ]
    return ConfirmPanel(
        title="Shut down every worker",
        summary=rows or [("tagged workers", "none")],
        warning="Every tagged instance is terminated and every tagged spot request cancelled; "
        "a song being generated is lost and is generated again by the next run.",
        acknowledgement="Terminate them",
        button_label="Shut down",
        action=action,
    )
