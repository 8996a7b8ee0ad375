"""Trade signalgen signals in LEAN: read the QuantConnect CSV day files, emit Insights, size by weight.

Files: `<mode>/quantconnect/<client>/<strategy>/<YYYYMMDD>.csv` under the LEAN data folder (local
and backtests) or under the same key in the Object Store (QuantConnect cloud): the same relative
path as under signalgen's `output_dir`. Columns and time semantics: docs/outputs.md. The last
column is the mode that produced the row; rows of any other mode than `mode` are skipped.

Parameters (LEAN `config.json` "parameters", or the cloud project's parameters):
    mode        signalgen mode whose signals to trade     (default historical; also simulation, live, mock)
    client      signalgen client id                       (default ikenna)
    strategy    strategy id                               (default swing_high_v1)
    symbols     comma-separated tickers the strategy runs (default AAPL,MSFT)
    timeframe   the strategy's bar length: 1m, 5m, 1h, 1d (default 5m); `period` counts these bars
    source      local (data folder) or object_store       (default local)
    start, end  backtest dates, YYYY-MM-DD                (default 2024-01-02 .. 2024-12-31)
"""

# region imports
import math
import os
from datetime import datetime, timedelta

from AlgorithmImports import *

# endregion

DIRECTIONS = {1: InsightDirection.UP, 0: InsightDirection.FLAT, -1: InsightDirection.DOWN}
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class SignalgenSignal(PythonData):
    """One signalgen signal, emitted to the algorithm at the time it became available."""

    # Which day files to read; set by the algorithm before it subscribes.
    MODE = "historical"
    CLIENT = "ikenna"
    STRATEGY = "swing_high_v1"
    FROM_OBJECT_STORE = False

    def get_source(self, config: SubscriptionDataConfig, date: datetime,
                   is_live_mode: bool) -> SubscriptionDataSource:
        key = (f"{SignalgenSignal.MODE}/quantconnect/{SignalgenSignal.CLIENT}/{SignalgenSignal.STRATEGY}/"
               f"{date:%Y%m%d}.csv")
        if SignalgenSignal.FROM_OBJECT_STORE:
            return SubscriptionDataSource(key, SubscriptionTransportMedium.OBJECT_STORE, FileFormat.CSV)
        return SubscriptionDataSource(os.path.join(Globals.data_folder, key),
                                      SubscriptionTransportMedium.LOCAL_FILE, FileFormat.CSV)

    def reader(self, config: SubscriptionDataConfig, line: str, date: datetime, is_live_mode: bool) -> BaseData:
        # LEAN skips a row the reader returns None for (the stubs do not say so, hence the ignores).
        if not line or not line[0].isdigit():  # the header row
            return None  # type: ignore[return-value]
        fields = line.strip().split(",")
        # A row without the mode column (an older file) or of another mode is not ours to trade:
        # a mock or research signal must never move this algorithm's holdings.
        if len(fields) != 9 or fields[8] != SignalgenSignal.MODE:
            return None  # type: ignore[return-value]
        time, symbol, direction, confidence, magnitude, weight, period, signal_id, _ = fields
        # A day file holds every symbol of the strategy; this subscription wants one.
        if symbol != config.symbol.value:
            return None  # type: ignore[return-value]
        signal = SignalgenSignal()
        signal.symbol = config.symbol
        # `time` (UTC, the subscription's zone) is when the signal existed: emit it then, not later.
        signal.time = datetime.strptime(time, "%Y-%m-%d %H:%M:%S")
        signal.end_time = signal.time
        signal.value = int(direction) * float(weight)
        signal["direction"] = int(direction)
        signal["confidence"] = float(confidence)
        signal["magnitude"] = float(magnitude) if magnitude else float("nan")
        signal["weight"] = float(weight)
        signal["period"] = int(period)
        signal["signal_id"] = signal_id
        signal["mode"] = SignalgenSignal.MODE
        return signal

    def is_sparse_data(self) -> bool:
        return True  # no signal in a minute is normal, not missing data


class SignalgenAlgorithm(QCAlgorithm):
    """One signalgen strategy: an Insight per signal, and holdings set to direction x weight."""

    def initialize(self) -> None:
        self.set_start_date(datetime.strptime(self.get_parameter("start", "2024-01-02"), "%Y-%m-%d"))
        self.set_end_date(datetime.strptime(self.get_parameter("end", "2024-12-31"), "%Y-%m-%d"))
        self.set_cash(100_000)
        SignalgenSignal.MODE = self.get_parameter("mode", "historical")
        SignalgenSignal.CLIENT = self.get_parameter("client", "ikenna")
        SignalgenSignal.STRATEGY = self.get_parameter("strategy", "swing_high_v1")
        SignalgenSignal.FROM_OBJECT_STORE = self.get_parameter("source", "local") == "object_store"
        timeframe = self.get_parameter("timeframe", "5m")
        self.bar = timedelta(**{UNITS[timeframe[-1]]: int(timeframe[:-1])})
        self.equities = {}  # signal subscription -> the equity it trades
        for ticker in self.get_parameter("symbols", "AAPL,MSFT").split(","):
            equity = self.add_equity(ticker.strip(), Resolution.MINUTE).symbol
            # Second resolution so LEAN never rounds a signal's time; UTC because the files are UTC.
            signals = self.add_data(SignalgenSignal, ticker.strip(), Resolution.SECOND, TimeZones.UTC).symbol
            self.equities[signals] = equity

    def on_data(self, slice: Slice) -> None:
        for signals, signal in slice.get(SignalgenSignal).items():
            equity = self.equities[signals]
            direction = int(signal["direction"])
            weight = float(signal["weight"])
            magnitude = float(signal["magnitude"])
            self.emit_insights(Insight.price(
                equity, self.bar * int(signal["period"]), DIRECTIONS[direction],
                None if math.isnan(magnitude) else magnitude,  # NaN: no model predicted one
                float(signal["confidence"]), "signalgen", weight, str(signal["signal_id"]),
            ))
            if self.securities[equity].has_data:
                self.set_holdings(equity, direction * weight)
