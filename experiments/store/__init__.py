"""The run store: MongoDB (embedded or given), the observer, recovery files, querying runs."""
