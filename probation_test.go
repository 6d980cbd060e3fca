package graceful

import (
	"errors"
	"io"
	"log"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestProbationOptions: settings that cannot work are refused by New, with
// an error that names the field.
func TestProbationOptions(t *testing.T) {
	for _, c := range []struct {
		opts Options
		want string
	}{
		{Options{Probation: time.Second, CanaryShare: -0.1}, "CanaryShare -0.1 is not a fraction from 0 to 1"},
		{Options{Probation: time.Second, CanaryShare: 1.5}, "CanaryShare 1.5 is not a fraction from 0 to 1"},
		{Options{Probation: time.Second, CanaryShare: math.NaN()}, "CanaryShare NaN"},
		{Options{Probation: time.Minute}, "Probation (1m0s) must be shorter than UpgradeTimeout (1m0s)"},
		{Options{Probation: 10 * time.Second, UpgradeTimeout: 5 * time.Second}, "Probation (10s) must be shorter than UpgradeTimeout (5s)"},
		{Options{Probation: -time.Second}, "Probation -1s is negative"},
		{Options{Probation: time.Second, ProbationMinRequests: -1}, "ProbationMinRequests -1 is negative"},
		{Options{Probation: time.Second, ProbationLatencyRatio: 0.5}, "ProbationLatencyRatio 0.5: want 1 or more"},
		{Options{Probation: time.Second, ProbationErrorMargin: 2}, "ProbationErrorMargin 2 is not a fraction"},
	} {
		p, err := New(c.opts)
		require.Error(t, err, "%+v", c.opts)
		assert.Nil(t, p)
		assert.Contains(t, err.Error(), c.want)
		assert.True(t, strings.HasPrefix(err.Error(), "graceful: "), err.Error())
	}
	o := Options{Probation: time.Second, UpgradeTimeout: time.Minute}
	require.NoError(t, o.checkProbation())
	assert.Equal(t, DefaultCanaryShare, o.CanaryShare)
	assert.Equal(t, DefaultProbationMinRequests, o.ProbationMinRequests)
	assert.Equal(t, DefaultProbationErrorMargin, o.ProbationErrorMargin)
	o = Options{ProbationErrorMargin: -1}
	require.NoError(t, o.checkProbation())
	assert.Zero(t, o.ProbationErrorMargin, "negative: no margin")
}

// TestVerdict: the judgement of a canary against the old process, case by
// case.
func TestVerdict(t *testing.T) {
	stats := func(requests, errors, panics int, p99 time.Duration) ProbationStats {
		return ProbationStats{Requests: requests, Errors: errors, Panics: panics, P99: p99}
	}
	judge := func(canary, stable ProbationStats) error {
		if canary.Requests > 5000 {
			return errors.New("too popular")
		}
		return nil
	}
	for _, c := range []struct {
		name           string
		opts           Options
		canary, stable ProbationStats
		want           string // "" promotes
		thin           bool
	}{
		{"clean", Options{}, stats(800, 0, 0, time.Millisecond), stats(7420, 7, 0, time.Millisecond), "", false},
		{"a failing build", Options{}, stats(812, 253, 0, time.Millisecond), stats(7420, 7, 0, time.Millisecond),
			"5xx 31.2% of 812 requests vs 0.1% of 7,420", false},
		{"panics count", Options{}, stats(812, 0, 100, time.Millisecond), stats(7420, 7, 0, time.Millisecond),
			"5xx and panics 12.3% of 812 requests vs 0.1% of 7,420", false},
		{"noise within the margin", Options{}, stats(1000, 8, 0, time.Millisecond), stats(9000, 20, 0, time.Millisecond), "", false},
		{"over the margin but not significant", Options{}, stats(100, 2, 0, time.Millisecond), stats(1000, 5, 0, time.Millisecond), "", false},
		{"no margin, significant", Options{ProbationErrorMargin: -1}, stats(10000, 100, 0, time.Millisecond), stats(10000, 10, 0, time.Millisecond),
			"5xx 1.0% of 10,000 requests vs 0.1% of 10,000", false},
		{"too thin to judge", Options{}, stats(99, 99, 0, time.Second), stats(7420, 0, 0, time.Millisecond), "", true},
		{"old process too thin: its rate counts as 0", Options{}, stats(200, 10, 0, time.Millisecond), stats(50, 50, 0, time.Millisecond),
			"5xx 5.0% of 200 requests vs 0.0% of 50", false},
		{"latency not judged by default", Options{}, stats(500, 0, 0, 50*time.Millisecond), stats(5000, 0, 0, time.Millisecond), "", false},
		{"latency judged", Options{ProbationLatencyRatio: 2}, stats(500, 0, 0, 50*time.Millisecond), stats(5000, 0, 0, time.Millisecond),
			"p99 50ms of 500 requests vs 1ms of 5,000 (more than 2x)", false},
		{"latency within the ratio", Options{ProbationLatencyRatio: 2}, stats(500, 0, 0, 19*time.Millisecond), stats(5000, 0, 0, 10*time.Millisecond), "", false},
		{"latency under the floor", Options{ProbationLatencyRatio: 2}, stats(500, 0, 0, 900*time.Microsecond), stats(5000, 0, 0, 30*time.Microsecond), "", false},
		{"checks fail", Options{}, ProbationStats{Requests: 500, Checks: `check "db": refused`}, stats(5000, 0, 0, time.Millisecond), `its checks fail: check "db": refused`, false},
		{"the user's judge", Options{ProbationJudge: judge}, stats(6000, 0, 0, time.Millisecond), stats(5000, 0, 0, time.Millisecond), "ProbationJudge: too popular", false},
		{"the user's judge on thin traffic", Options{ProbationJudge: judge}, stats(10, 0, 0, time.Millisecond), stats(5000, 0, 0, time.Millisecond), "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := c.opts
			o.UpgradeTimeout = time.Minute
			require.NoError(t, o.checkProbation())
			got, thin := o.verdict(c.canary, c.stable)
			assert.Equal(t, c.want, got)
			assert.Equal(t, c.thin, thin)
		})
	}
}

// TestDiverterShare: the split is exact, whatever the share.
func TestDiverterShare(t *testing.T) {
	for _, share := range []float64{0.01, 0.1, 0.25, 1.0 / 3, 0.5, 0.9, 1} {
		d := &diverter{share: share}
		picked := 0
		for range 3000 {
			if d.pick() {
				picked++
			}
		}
		assert.Equal(t, int(math.Floor(3000*share+1e-9)), picked, "share %v", share)
	}
}

// TestRequestStats: what a process served, counted through a real server:
// statuses, panics (not http.ErrAbortHandler), hijacked connections left
// out; the writer still flushes and hijacks through http.ResponseController
// and type assertions.
func TestRequestStats(t *testing.T) {
	s := &requestStats{}
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", http.StatusBadGateway) })
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) { time.Sleep(20 * time.Millisecond) })
	mux.HandleFunc("/panic", func(w http.ResponseWriter, r *http.Request) { panic("boom") })
	mux.HandleFunc("/abort", func(w http.ResponseWriter, r *http.Request) { panic(http.ErrAbortHandler) })
	mux.HandleFunc("/flush", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "a")
		w.(http.Flusher).Flush()
		require.NoError(t, http.NewResponseController(w).Flush())
	})
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, r *http.Request) {
		c, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		rw.WriteString("HTTP/1.1 500 Hijacked\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		rw.Flush()
		c.Close()
	})
	srv := httptest.NewUnstartedServer(s.handler(mux))
	srv.Config.ErrorLog = newDiscardLogger()
	srv.Start()
	defer srv.Close()
	// A new connection each time: the client retries nothing.
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	get := func(path string) int {
		resp, err := c.Get(srv.URL + path)
		if err != nil {
			return 0
		}
		io.Copy(io.Discard, resp.Body) // complete: the handler has returned
		resp.Body.Close()
		return resp.StatusCode
	}
	base := s.snapshot()
	assert.Equal(t, 200, get("/ok"))
	assert.Equal(t, 200, get("/ok"))
	assert.Equal(t, 502, get("/fail"))
	assert.Equal(t, 200, get("/slow"))
	assert.Equal(t, 0, get("/panic"))
	assert.Equal(t, 0, get("/abort"))
	assert.Equal(t, 200, get("/flush"))
	assert.Equal(t, 500, get("/hijack"))
	got := s.snapshot().since(base)
	assert.Equal(t, ProbationStats{Requests: 6, Errors: 1, Panics: 1, P99: got.P99}, got)
	assert.GreaterOrEqual(t, got.P99, 20*time.Millisecond)
	assert.Less(t, got.P99, 20*time.Millisecond*5/4+time.Millisecond, "25%% resolution")
}

func newDiscardLogger() *log.Logger { return log.New(io.Discard, "", 0) }

func TestThousands(t *testing.T) {
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 7420: "7,420", 1234567: "1,234,567", -1234: "-1,234"} {
		assert.Equal(t, want, thousands(n))
	}
}
