"""Process model: one supervised OS process per client x strategy x symbol x timeframe (issue 8)."""
