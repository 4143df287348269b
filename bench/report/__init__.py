"""Reports: tables and plots generated from the results store, measuring nothing."""
