"""Task-neutral report parts: plots (confusion matrix, ROC, training curves, label efficiency, heat-map overlays),
result tables (CSV, mean ± std markdown), predictions.csv and a self-contained report.html.

Every writer takes the output path first and writes atomically; none knows a task or a model.
"""

from samadapt.reports.confusion import plot_confusion_matrix
from samadapt.reports.curves import plot_label_efficiency, plot_training_curves
from samadapt.reports.figures import new_figure, save_figure
from samadapt.reports.html import write_html_report
from samadapt.reports.overlay import overlay_heatmap, save_overlay
from samadapt.reports.predictions import write_predictions_csv
from samadapt.reports.roc import plot_roc
from samadapt.reports.tables import (
    markdown_table,
    mean_std_markdown,
    mean_std_rows,
    read_csv_rows,
    write_csv_rows,
)

__all__ = [
    "markdown_table",
    "mean_std_markdown",
    "mean_std_rows",
    "new_figure",
    "overlay_heatmap",
    "plot_confusion_matrix",
    "plot_label_efficiency",
    "plot_roc",
    "plot_training_curves",
    "read_csv_rows",
    "save_figure",
    "save_overlay",
    "write_csv_rows",
    "write_html_report",
    "write_predictions_csv",
]
