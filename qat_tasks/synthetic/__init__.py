"""Generated MangaAssist traffic, in the traffic schema, for the bundled sample, the tests and drift demos; never
read by the pipeline itself, which only sees what lies in the traffic store."""
