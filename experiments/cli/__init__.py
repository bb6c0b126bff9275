"""The pqa command line (click): one module per command group."""
