"""Speed and quality harnesses, tasks and plots."""
