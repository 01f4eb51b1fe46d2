"""Training loops and the headless `dagman` command line of DAGMaN."""
