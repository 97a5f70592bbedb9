"""``batchinfer report``: one self-contained HTML page of a job or an output (see ``command``)."""

from producer.report.command import make_report, report_command

__all__ = ["make_report", "report_command"]
