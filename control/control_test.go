package control_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/graceful-go/graceful"
	"github.com/graceful-go/graceful/control"
)

// answering serves one connection at a Unix socket: it reads the request
// line and writes answer (then closes).
func answering(t *testing.T, answer func(w io.Writer)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "control.sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		bufio.NewReader(c).ReadString('\n')
		w := bufio.NewWriter(c)
		answer(w)
		w.Flush()
	}()
	return sock
}

// TestDetailsLarge (issue 20 item 16): an answer of any length up to
// MaxAnswer is read (before: 64 KiB, then "closed the connection without
// an answer"); a longer one is an error that says so.
func TestDetailsLarge(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	want := graceful.Status{PID: 42, Build: strings.Repeat("b", 100<<10), Executable: "/srv/x"}
	b, err := json.Marshal(want)
	require.NoError(t, err)
	sock := answering(t, func(w io.Writer) { fmt.Fprintf(w, "ok %s\n", b) })
	st, err := control.Details(ctx, sock)
	require.NoError(t, err)
	assert.Equal(t, want.Build, st.Build)

	sock = answering(t, func(w io.Writer) {
		io.WriteString(w, "ok ")
		w.Write(make([]byte, control.MaxAnswer+10))
	})
	_, err = control.Details(ctx, sock)
	assert.ErrorContains(t, err, "control: status-json: answer longer than 16 MiB")
}

// TestNoAnswer: a request sent and left without an answer wraps
// ErrNoAnswer (an upgrade may still go on); an error answer does not.
func TestNoAnswer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sock := answering(t, func(io.Writer) {})
	_, err := control.Upgrade(ctx, sock)
	assert.ErrorIs(t, err, control.ErrNoAnswer)
	assert.ErrorContains(t, err, "closed the connection without an answer")

	sock = answering(t, func(w io.Writer) { io.WriteString(w, "error graceful: upgrade: child exited\n") })
	_, err = control.Upgrade(ctx, sock)
	assert.EqualError(t, err, "graceful: upgrade: child exited")
	assert.NotErrorIs(t, err, control.ErrNoAnswer)

	_, err = control.Upgrade(ctx, filepath.Join(t.TempDir(), "none.sock"))
	assert.NotErrorIs(t, err, control.ErrNoAnswer, "nothing was sent")
}
