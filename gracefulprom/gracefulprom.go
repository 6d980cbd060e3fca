// Package gracefulprom exports the upgrades and drains of a graceful
// process as Prometheus metrics. It lives apart from package graceful so
// that only the programs that use it download the Prometheus client.
//
//	m := gracefulprom.New()
//	p, err := graceful.New(graceful.Options{OnEvent: m.Observe})
//	...
//	prometheus.MustRegister(m)
//	mux.Handle("GET /metrics", promhttp.Handler())
//
// The counters carry on across upgrades: each new process starts from the
// totals its predecessor passed on ([graceful.Totals]), so a dashboard sees
// one series per service, not one that restarts at every upgrade. The
// histograms count what this process saw: the upgrade that started it
// (reported once it serves), the attempts it made itself, and its
// predecessor's drain, which the predecessor reports to it as it exits.
//
// Metrics:
//
//	graceful_generation                        gauge: 1 for a process started cold, one more at each upgrade
//	graceful_upgrades_total{outcome}           counter: succeeded, failed, rolled-back
//	graceful_upgrade_duration_seconds{outcome} histogram: start of an upgrade to the new process ready, or to its failure
//	graceful_drains_total                      counter
//	graceful_drain_duration_seconds            histogram
//	graceful_drain_connections_total{fate}     counter: handed, not_handed, retired, expired, forced
//	graceful_drain_goodbyes_total              counter: long-lived streams told goodbye
//	graceful_drain_in_flight                   gauge: requests in flight when the last drain began
//	graceful_events_dropped_total              counter: events not delivered because Observe fell behind
package gracefulprom

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/graceful-go/graceful"
)

// Metrics is a prometheus.Collector of a graceful process's upgrades and
// drains, fed by Observe. Create it with New.
type Metrics struct {
	upgradeDuration *prometheus.HistogramVec
	drainDuration   prometheus.Histogram

	mu         sync.Mutex
	generation int
	totals     graceful.Totals
	inFlight   int
	dropped    int

	generationDesc, upgradesDesc, drainsDesc, connsDesc, goodbyesDesc, inFlightDesc, droppedDesc *prometheus.Desc
}

// New returns Metrics with no observation yet. Set its Observe as
// [graceful.Options.OnEvent] and register it with a Prometheus registry.
func New() *Metrics {
	return &Metrics{
		upgradeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "graceful_upgrade_duration_seconds",
			Help:    "Time from the start of an upgrade to the new process being ready, or to its failure.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"outcome"}),
		drainDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "graceful_drain_duration_seconds",
			Help:    "Time a drain took, from its start to the last connection closed or handed over.",
			Buckets: []float64{.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}),
		generationDesc: prometheus.NewDesc("graceful_generation", "Generation of the serving process: 1 for a process started cold, one more at each upgrade.", nil, nil),
		upgradesDesc:   prometheus.NewDesc("graceful_upgrades_total", "Upgrades by outcome, since the first generation started.", []string{"outcome"}, nil),
		drainsDesc:     prometheus.NewDesc("graceful_drains_total", "Drains that finished, since the first generation started.", nil, nil),
		connsDesc:      prometheus.NewDesc("graceful_drain_connections_total", "Connections of finished drains by fate: handed to the new process, not handed (closed instead), retired idle, expired (request did not arrive in time), forced closed at the deadline.", []string{"fate"}, nil),
		goodbyesDesc:   prometheus.NewDesc("graceful_drain_goodbyes_total", "Long-lived streams told goodbye by finished drains.", nil, nil),
		inFlightDesc:   prometheus.NewDesc("graceful_drain_in_flight", "Requests in flight when the last drain began.", nil, nil),
		droppedDesc:    prometheus.NewDesc("graceful_events_dropped_total", "Events not delivered to Observe because it fell behind.", nil, nil),
	}
}

// Observe records e; use it as [graceful.Options.OnEvent].
func (m *Metrics) Observe(e graceful.Event) {
	m.mu.Lock()
	m.totals = maxTotals(m.totals, e.Totals) // counters never go back
	m.dropped += e.Dropped
	switch e.Kind {
	case graceful.EventServing, graceful.EventProbation:
		m.generation = e.Generation // a canary's own, while it serves its share
	case graceful.EventDrainStarted:
		m.inFlight = e.Drain.InFlight
	case graceful.EventDrainFinished:
		m.inFlight = e.Drain.InFlight
	}
	m.mu.Unlock()
	switch e.Kind {
	case graceful.EventUpgradeSucceeded:
		m.upgradeDuration.WithLabelValues(string(graceful.OutcomeSucceeded)).Observe(e.Duration.Seconds())
	case graceful.EventUpgradeFailed:
		outcome := graceful.OutcomeFailed
		if errors.Is(e.Err, graceful.ErrRolledBack) {
			outcome = graceful.OutcomeRolledBack
		}
		m.upgradeDuration.WithLabelValues(string(outcome)).Observe(e.Duration.Seconds())
	case graceful.EventDrainFinished:
		m.drainDuration.Observe(e.Duration.Seconds())
	}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.generationDesc, m.upgradesDesc, m.drainsDesc, m.connsDesc, m.goodbyesDesc, m.inFlightDesc, m.droppedDesc} {
		ch <- d
	}
	m.upgradeDuration.Describe(ch)
	m.drainDuration.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	gen, t, inFlight, dropped := m.generation, m.totals, m.inFlight, m.dropped
	m.mu.Unlock()
	counter := func(d *prometheus.Desc, v int, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	if gen > 0 {
		ch <- prometheus.MustNewConstMetric(m.generationDesc, prometheus.GaugeValue, float64(gen))
	}
	counter(m.upgradesDesc, t.Succeeded, string(graceful.OutcomeSucceeded))
	counter(m.upgradesDesc, t.Failed, string(graceful.OutcomeFailed))
	counter(m.upgradesDesc, t.RolledBack, string(graceful.OutcomeRolledBack))
	counter(m.drainsDesc, t.Drains)
	d := t.Drain
	counter(m.connsDesc, d.Handed, "handed")
	counter(m.connsDesc, d.NotHanded, "not_handed")
	counter(m.connsDesc, d.Retired, "retired")
	counter(m.connsDesc, d.Expired, "expired")
	counter(m.connsDesc, d.Forced, "forced")
	counter(m.goodbyesDesc, d.Goodbyes)
	ch <- prometheus.MustNewConstMetric(m.inFlightDesc, prometheus.GaugeValue, float64(inFlight))
	counter(m.droppedDesc, dropped)
	m.upgradeDuration.Collect(ch)
	m.drainDuration.Collect(ch)
}

// maxTotals is a and b, field by field the larger.
func maxTotals(a, b graceful.Totals) graceful.Totals {
	d, e := a.Drain, b.Drain
	return graceful.Totals{
		Succeeded:  max(a.Succeeded, b.Succeeded),
		Failed:     max(a.Failed, b.Failed),
		RolledBack: max(a.RolledBack, b.RolledBack),
		Drains:     max(a.Drains, b.Drains),
		Drain: graceful.DrainStats{
			Duration: max(d.Duration, e.Duration), InFlight: max(d.InFlight, e.InFlight),
			Handed: max(d.Handed, e.Handed), NotHanded: max(d.NotHanded, e.NotHanded),
			Retired: max(d.Retired, e.Retired), Expired: max(d.Expired, e.Expired),
			Forced: max(d.Forced, e.Forced), Goodbyes: max(d.Goodbyes, e.Goodbyes),
		},
		EventsDropped: max(a.EventsDropped, b.EventsDropped),
	}
}
