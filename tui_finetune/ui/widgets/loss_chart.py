"""The loss chart: train and eval loss by step, drawn by textual-plotext."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class LossChart(PlotextPlot):
    DEFAULT_CSS = """
    LossChart { height: 1fr; min-height: 8; }
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.points = 0
        self._shown: tuple = ()

    def on_mount(self) -> None:
        self.plt.title("loss")
        self.plt.xlabel("step")

    def update_points(self, train: tuple[tuple[float, float], ...], evals: tuple[tuple[float, float], ...]) -> None:
        """Redraw only when the series changed: plotting is the costliest thing the monitor does."""
        if (train, evals) == self._shown:
            return
        self._shown = (train, evals)
        self.points = len(train) + len(evals)
        plt = self.plt
        plt.clear_data()
        if train:
            plt.plot([p[0] for p in train], [p[1] for p in train], label="train", marker="braille")
        if evals:
            plt.plot([p[0] for p in evals], [p[1] for p in evals], label="eval", marker="dot")
        self.refresh()
