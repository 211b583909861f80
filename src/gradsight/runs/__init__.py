"""Running an analysis: the run store on disk and the distributed session."""
