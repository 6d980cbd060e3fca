package graceful

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func probe(h http.Handler, query ...string) (int, string) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz"+strings.Join(query, ""), nil))
	return rec.Code, strings.TrimSpace(rec.Body.String())
}

func TestReadinessLifecycle(t *testing.T) {
	life := newLifecycle()
	h := newHealth(life, time.Second, -1) // no cache: each probe sees the change
	var dbDown atomic.Bool
	h.AddCheck("db", func(context.Context) error {
		if dbDown.Load() {
			return errors.New("connection refused")
		}
		return nil
	})
	code, body := probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "started: not ready yet", body)

	life.enter(PhaseChecking)
	code, _ = probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code, "not ready while the pre-ready checks run")
	life.enter(PhaseServing)
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", body)

	dbDown.Store(true)
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "check:db: connection refused", body)

	dbDown.Store(false)
	_, ok := life.enter(PhaseDelaying)
	require.True(t, ok)
	_, ok = life.enter(PhaseServing)
	assert.False(t, ok, "nothing flips readiness back once draining")
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "draining: process is draining", body)

	code, body = probe(h.Liveness())
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", body)
}

func TestWaitPass(t *testing.T) {
	h := newHealth(readyLifecycle(), time.Second, time.Hour)
	var calls atomic.Int32
	h.AddCheck("warm-up", func(context.Context) error {
		if calls.Add(1) < 3 {
			return errors.New("warming up")
		}
		return nil
	})
	require.NoError(t, h.waitPass(context.Background(), 10*time.Second))
	assert.EqualValues(t, 3, calls.Load())

	never := newHealth(readyLifecycle(), time.Second, time.Hour)
	never.AddCheck("db", func(context.Context) error { return errors.New("unreachable") })
	err := never.waitPass(context.Background(), 100*time.Millisecond)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `check "db": unreachable`)
}

func TestReadinessVerbose(t *testing.T) {
	h := newHealth(readyLifecycle(), time.Second, -1)
	h.AddCheck("db", func(context.Context) error { return nil })
	h.AddCheck("cache", func(context.Context) error { return errors.New("no route to host") })
	code, body := probe(h.Readiness(), "?verbose")
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "[+]started ok\n[+]draining ok\n[+]check:db ok\n[-]check:cache failed: no route to host\nreadyz check failed", body)

	code, body = probe(h.Liveness(), "?verbose")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "[+]ping ok\nlivez check passed", body)
}

// Probes reuse a result within the cache interval, so a burst of probes
// calls a dependency once; a slow check is cut at the check timeout.
func TestChecksCachedAndBounded(t *testing.T) {
	h := newHealth(readyLifecycle(), 50*time.Millisecond, time.Hour)
	var calls atomic.Int32
	h.AddCheck("db", func(context.Context) error { calls.Add(1); return nil })
	h.AddCheck("slow", func(ctx context.Context) error {
		<-ctx.Done()
		return ctx.Err()
	})
	for range 20 {
		code, body := probe(h.Readiness())
		assert.Equal(t, http.StatusServiceUnavailable, code)
		assert.Contains(t, body, "check:slow: timed out after 50ms")
	}
	assert.EqualValues(t, 1, calls.Load(), "cached")
}

// readyLifecycle returns a lifecycle in PhaseServing.
func readyLifecycle() *lifecycle {
	l := newLifecycle()
	l.enter(PhaseChecking)
	l.enter(PhaseServing)
	return l
}
