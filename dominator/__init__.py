"""The dominator: the herd that converges every sub, the deploy stage, and the
`dominator` admin CLI."""
