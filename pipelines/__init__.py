"""KFP pipelines over the components in `components/`: `transfer` defines the transfer
pipeline, `launch` compiles it, runs it locally, submits it to a KFP endpoint or schedules it
(the `tl pipeline ...` commands)."""
