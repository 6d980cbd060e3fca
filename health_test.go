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

func probe(h http.Handler) (int, string) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	return rec.Code, strings.TrimSpace(rec.Body.String())
}

func TestReadinessLifecycle(t *testing.T) {
	h := newHealth()
	var dbDown atomic.Bool
	h.AddCheck("db", func(context.Context) error {
		if dbDown.Load() {
			return errors.New("connection refused")
		}
		return nil
	})
	code, body := probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "not ready", body)

	h.setReady()
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", body)

	dbDown.Store(true)
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Contains(t, body, `check "db": connection refused`)

	dbDown.Store(false)
	h.setDraining()
	h.setReady() // nothing flips readiness back once draining
	code, body = probe(h.Readiness())
	assert.Equal(t, http.StatusServiceUnavailable, code)
	assert.Equal(t, "draining", body)

	code, body = probe(h.Liveness())
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, "ok", body)
}

func TestWaitPass(t *testing.T) {
	h := newHealth()
	var calls atomic.Int32
	h.AddCheck("warm-up", func(context.Context) error {
		if calls.Add(1) < 3 {
			return errors.New("warming up")
		}
		return nil
	})
	require.NoError(t, h.waitPass(context.Background(), 10*time.Second))
	assert.EqualValues(t, 3, calls.Load())

	never := newHealth()
	never.AddCheck("db", func(context.Context) error { return errors.New("unreachable") })
	err := never.waitPass(context.Background(), 100*time.Millisecond)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `check "db": unreachable`)
}
