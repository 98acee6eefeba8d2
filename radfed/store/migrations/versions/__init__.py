"""The run store's schema revisions, oldest first."""
