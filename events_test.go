package graceful_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful/internal/loadtest"
)

// hooked is one event a helper recorded from Options.OnEvent.
type hooked struct {
	pid    int               // the process whose hook saw it
	kind   string            // Event.Kind
	line   string            // everything after the kind
	fields map[string]string // key=value pairs of line
}

// hooks returns the OnEvent events every generation recorded, in order.
func (h *helper) hooks() []hooked {
	var out []hooked
	for _, e := range h.events() {
		rest, ok := strings.CutPrefix(e.name, "hook ")
		if !ok {
			continue
		}
		kind, line, _ := strings.Cut(rest, " ")
		f := map[string]string{}
		for kv := range strings.FieldsSeq(line) {
			k, v, _ := strings.Cut(kv, "=")
			f[k] = v
		}
		out = append(out, hooked{e.pid, kind, line, f})
	}
	return out
}

// TestEvents: OnEvent reports each step of a failed and of a successful
// upgrade and of the drain, in the process where it happens, and the new
// process is told how its predecessor drained, with the same figures.
func TestEvents(t *testing.T) {
	h := startHelper(t, []string{"-events-hook"}, loadtest.Config{})
	old := h.PID()

	// Five idle keep-alive connections, and a stream in flight.
	for range 5 {
		c, err := net.Dial("tcp", h.Addr)
		require.NoError(t, err)
		defer c.Close()
		_, err = io.WriteString(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n")
		require.NoError(t, err)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		require.NoError(t, err)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	stream, err := (&http.Client{Transport: tr}).Get("http://" + h.Addr + "/stream")
	require.NoError(t, err)
	defer stream.Body.Close()

	h.setMode(modeExit)
	require.NotEmpty(t, h.upgradeViaAPI().err, "the new version exits at start")
	h.setMode(modeOK)
	require.Empty(t, h.upgradeViaAPI().err)
	successor := h.waitNewPID(old, evReady)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = h.WaitExit(ctx, old)
	require.NoError(t, err)
	h.Follow()
	bye, err := io.ReadAll(stream.Body)
	require.NoError(t, err)
	assert.Equal(t, "bye", string(bye))

	// The old process's report reaches the new one before the old exits;
	// the new one reads it in its own time.
	var told *hooked
	for deadline := time.Now().Add(10 * time.Second); told == nil; {
		for _, e := range h.hooks() {
			if e.pid == successor && e.kind == "drain-finished" {
				told = &e
			}
		}
		if told == nil {
			require.False(t, time.Now().After(deadline), "the new process never heard how the old one drained")
			time.Sleep(5 * time.Millisecond)
		}
	}

	byPID := map[int][]hooked{}
	for _, e := range h.hooks() {
		byPID[e.pid] = append(byPID[e.pid], e)
	}
	kinds := func(pid int) []string {
		var ks []string
		for _, e := range byPID[pid] {
			ks = append(ks, e.kind)
		}
		return ks
	}
	assert.Equal(t, []string{"serving", "upgrade-started", "upgrade-failed", "upgrade-started", "upgrade-succeeded", "drain-started", "drain-finished"}, kinds(old))
	assert.Equal(t, []string{"upgrade-succeeded", "serving", "drain-finished"}, kinds(successor))

	o := byPID[old]
	oldPID, newPID := strconv.Itoa(old), strconv.Itoa(successor)
	assert.Equal(t, "1", o[0].fields["gen"])
	assert.Equal(t, "0", o[2].fields["new"], "the failed version exited before it could say its PID")
	assert.Equal(t, "true", o[2].fields["err"])
	assert.Equal(t, "1", o[2].fields["failed"])
	assert.Equal(t, newPID, o[4].fields["new"])
	assert.Equal(t, "false", o[4].fields["err"])
	assert.Equal(t, "2", o[5].fields["in-flight"], "the stream and the /upgrade request itself")
	assert.Equal(t, "1", o[5].fields["succeeded"])
	fin := o[6].fields
	assert.Equal(t, oldPID, fin["pid"])
	assert.Equal(t, "1", fin["goodbyes"], "the stream")
	handed, _ := strconv.Atoi(fin["handed"])
	assert.GreaterOrEqual(t, handed, 5, "the idle connections (and those of the stream and the upgrade request once idle)")
	for _, k := range []string{"not-handed", "retired", "expired", "forced"} {
		assert.Equal(t, "0", fin[k], k)
	}
	assert.Equal(t, "1", fin["succeeded"])
	assert.Equal(t, "1", fin["failed"])
	assert.Equal(t, "1", fin["drains"])

	n := byPID[successor]
	assert.Equal(t, oldPID, n[0].fields["pid"], "the upgrade, as the new process saw it")
	assert.Equal(t, newPID, n[0].fields["new"])
	assert.Equal(t, "1", n[0].fields["gen"])
	assert.Equal(t, "2", n[1].fields["gen"])
	assert.Equal(t, "1", n[1].fields["failed"], "the record of the failed attempt came along")
	assert.Equal(t, o[6].line, told.line, "the new process reports the old one's drain with the same figures")
}

// TestEventsForced: a drain that reaches its deadline counts what it cut,
// once each: a request still running and a hijacked connection; an idle
// connection retired before is not counted again.
func TestEventsForced(t *testing.T) {
	h := startHelper(t, []string{"-events-hook", "-drain-timeout", "2s", "-idle-grace", "100ms"}, loadtest.Config{})
	pid := h.PID()
	idle := dialRaw(t, h.Addr)
	idle.send("/")
	require.Equal(t, http.StatusOK, idle.response().StatusCode)
	slow := dialRaw(t, h.Addr)
	slow.send("/slow?ms=20000")
	h.waitEvent(pid, evSlowStarted)
	hj := dialRaw(t, h.Addr)
	hj.send("/hijack")
	for line := ""; line != "hijacked\n"; { // its body has no end but the connection's
		var err error
		line, err = hj.r.ReadString('\n')
		require.NoError(t, err)
	}
	require.NoError(t, h.Signal(syscall.SIGTERM))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := h.WaitExit(ctx, pid)
	require.NoError(t, err)
	var fin *hooked
	for _, e := range h.hooks() {
		if e.kind == "drain-finished" {
			fin = &e
		}
	}
	require.NotNil(t, fin)
	assert.Equal(t, "2", fin.fields["forced"], "the slow request and the hijacked connection")
	assert.Equal(t, "1", fin.fields["retired"], "the idle connection")
	assert.Equal(t, "2", fin.fields["in-flight"])
}
