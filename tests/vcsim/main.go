// Command vcsim runs VMware's vCenter simulator (govmomi/simulator) for Zerfaux's tests and benchmarks.
//
// It differs from govmomi's own vcsim command in what the tests need: TLS is always on with a
// certificate made for this run (written to a file so a client can trust it), a username and
// password are required (so wrong credentials really fail), datastores can be backed by a given
// directory (the DR replica's mountpoint), CreateNasDatastore names the datastore localPath and
// backs it by the directory remotePath as an ESXi host would (esxiNasDatastoreSystem), and a per-call delay can be set at start and changed
// while running through stdin. When ready it prints one JSON line on stdout:
//
//	{"url": "https://127.0.0.1:PORT/sdk", "host": "127.0.0.1", "port": PORT, "cert_file": "...",
//	 "thumbprint_sha1": "AA:BB:...", "thumbprint_sha256": "..."}
//
// With -stdin, each stdin line is a command ("delay <ms>") and end of input stops the simulator,
// so a crashed test run cannot leave it behind.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// listFlag collects a repeatable flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

type ready struct {
	URL              string `json:"url"`
	Host             string `json:"host"`
	Port             int    `json:"port"`
	CertFile         string `json:"cert_file"`
	ThumbprintSHA1   string `json:"thumbprint_sha1"`
	ThumbprintSHA256 string `json:"thumbprint_sha256"`
	VMs              int    `json:"vms"`
}

func main() {
	dc := flag.Int("dc", 1, "datacenters")
	cluster := flag.Int("cluster", 1, "clusters per datacenter")
	host := flag.Int("host", 2, "hosts per cluster")
	standalone := flag.Int("standalone-host", 0, "standalone hosts per datacenter")
	vm := flag.Int("vm", 2, "VMs per resource pool (per host)")
	ds := flag.Int("ds", 1, "simulator-made local datastores (LocalDS_n)")
	pool := flag.Int("pool", 0, "child resource pools per cluster")
	username := flag.String("username", "zerfaux", "the only username accepted")
	password := flag.String("password", "", "the only password accepted (required)")
	delay := flag.Int("delay", 0, "milliseconds added to every SOAP call once the inventory is built")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (port 0: a random one)")
	certFile := flag.String("cert-file", "", "where to write the PEM certificate (default: a temp file)")
	stdinControl := flag.Bool("stdin", false, "read commands from stdin; stop at end of input")
	var localDS, nasDS listFlag
	flag.Var(&localDS, "local-ds", "NAME=DIR: a local datastore backed by DIR on every host (repeatable)")
	flag.Var(&nasDS, "nas-ds", "DIR: an NFS datastore named after DIR's base name, backed by DIR (repeatable)")
	flag.Parse()
	if *password == "" {
		log.Fatal("-password is required: the simulator must refuse wrong credentials")
	}

	model := simulator.VPX()
	model.Datacenter = *dc
	model.Cluster = *cluster
	model.ClusterHost = *host
	model.Host = *standalone
	model.Machine = *vm
	model.Datastore = *ds
	model.Pool = *pool
	if err := model.Create(); err != nil {
		log.Fatalf("create inventory: %v", err)
	}
	defer model.Remove()
	presentNasAsESXi()

	cert, pemBytes, err := selfSigned()
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	server := model.Service.NewServer()
	defer server.Close()

	path := *certFile
	if path == "" {
		dir, derr := ioutil.TempDir("", "zerfaux-vcsim-")
		if derr != nil {
			log.Fatalf("temp dir: %v", derr)
		}
		defer os.RemoveAll(dir)
		path = filepath.Join(dir, "cert.pem")
	}
	if err := ioutil.WriteFile(path, pemBytes, 0o644); err != nil {
		log.Fatalf("write certificate: %v", err)
	}

	// The server URL carries the non-loopback address when listening on 0.0.0.0; keep what we asked for.
	addr := server.Server.Listener.Addr().(*net.TCPAddr)
	sdk := &url.URL{Scheme: "https", Host: net.JoinHostPort(addr.IP.String(), strconv.Itoa(addr.Port)), Path: "/sdk"}
	if err := addDatastores(sdk, *username, *password, localDS, nasDS); err != nil {
		log.Fatalf("datastores: %v", err)
	}
	// Delay only what clients do, not our own set-up calls above.
	model.DelayConfig.Delay = *delay

	leaf := cert.Certificate[0]
	out, _ := json.Marshal(ready{
		URL:              sdk.String(),
		Host:             addr.IP.String(),
		Port:             addr.Port,
		CertFile:         path,
		ThumbprintSHA1:   thumbprint(sha1Sum(leaf)),
		ThumbprintSHA256: thumbprint(sha256Sum(leaf)),
		VMs:              model.Count().Machine,
	})
	fmt.Println(string(out))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	if *stdinControl {
		go control(model, done)
	}
	select {
	case <-stop:
	case <-done:
	}
}

// control applies stdin commands until end of input.
func control(model *simulator.Model, done chan<- struct{}) {
	defer close(done)
	scanner := bufio.NewScanner(os.Stdin)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) == 2 && fields[0] == "delay" {
			if ms, err := strconv.Atoi(fields[1]); err == nil {
				model.DelayConfig.Delay = ms
				fmt.Println(`{"delay":` + strconv.Itoa(ms) + `}`)
				continue
			}
		}
		if len(fields) > 0 {
			log.Printf("unknown command %q (known: delay <ms>)", scanner.Text())
		}
	}
}

// esxiNasDatastoreSystem is a host's HostDatastoreSystem whose CreateNasDatastore behaves as a
// real ESXi host's does for the caller: the datastore is named spec.localPath and its files are
// those of remoteHost:remotePath. The simulator mounts nothing, so remotePath must be a directory
// on this machine (an NFS export's path on a storage host that is this machine in the tests).
// vcsim's own CreateNasDatastore takes localPath as a local directory and names the datastore
// after its base name, which a client written for ESXi cannot use.
//
// The simulator's type is embedded by value, not by pointer: its PropertyCollector finds the mo
// type by descending through the first field of each struct, which must not be a pointer.
type esxiNasDatastoreSystem struct {
	simulator.HostDatastoreSystem
}

func (dss *esxiNasDatastoreSystem) CreateNasDatastore(ctx *simulator.Context, c *types.CreateNasDatastore) soap.HasFault {
	name := c.Spec.LocalPath
	if e := simulator.Map.FindByName(name, dss.Datastore); e != nil {
		return &methods.CreateNasDatastoreBody{
			Fault_: simulator.Fault(e.Reference().Value, &types.DuplicateName{Name: name, Object: e.Reference()}),
		}
	}
	req := *c
	req.Spec.LocalPath = c.Spec.RemotePath // the directory the simulator's own method reads
	body := dss.HostDatastoreSystem.CreateNasDatastore(ctx, &req).(*methods.CreateNasDatastoreBody)
	if body.Fault_ != nil || body.Res == nil {
		return body
	}
	ds, ok := simulator.Map.Get(body.Res.Returnval).(*simulator.Datastore)
	if !ok {
		return body
	}
	ctx.WithLock(ds, func() {
		ds.Name = name
		ds.Summary.Name = name
		if info, ok := ds.Info.(*types.NasDatastoreInfo); ok {
			info.Name = name
			if info.Nas != nil {
				info.Nas.Name = name
			}
		}
	})
	return body
}

// presentNasAsESXi puts esxiNasDatastoreSystem in place of every host's datastore system.
func presentNasAsESXi() {
	for _, e := range simulator.Map.All("HostSystem") {
		host, ok := e.(*simulator.HostSystem)
		if !ok || host.ConfigManager.DatastoreSystem == nil {
			continue
		}
		orig, ok := simulator.Map.Get(*host.ConfigManager.DatastoreSystem).(*simulator.HostDatastoreSystem)
		if !ok {
			continue
		}
		simulator.Map.Put(&esxiNasDatastoreSystem{HostDatastoreSystem: *orig})
	}
}

// addDatastores mounts directory-backed datastores on every host of every datacenter.
func addDatastores(sdk *url.URL, username, password string, local, nas []string) error {
	if len(local) == 0 && len(nas) == 0 {
		return nil
	}
	ctx := context.Background()
	u := *sdk
	u.User = url.UserPassword(username, password)
	client, err := govmomi.NewClient(ctx, &u, true)
	if err != nil {
		return err
	}
	defer client.Logout(ctx)
	finder := find.NewFinder(client.Client, false)
	dcs, err := finder.DatacenterList(ctx, "*")
	if err != nil {
		return err
	}
	for _, dc := range dcs {
		finder.SetDatacenter(dc)
		hosts, err := finder.HostSystemList(ctx, "*")
		if err != nil {
			return err
		}
		for _, h := range hosts {
			dss, err := h.ConfigManager().DatastoreSystem(ctx)
			if err != nil {
				return err
			}
			for _, spec := range local {
				parts := strings.SplitN(spec, "=", 2)
				if len(parts) != 2 {
					return fmt.Errorf("-local-ds %q: want NAME=DIR", spec)
				}
				if _, err := dss.CreateLocalDatastore(ctx, parts[0], parts[1]); err != nil {
					return fmt.Errorf("local datastore %s: %v", parts[0], err)
				}
			}
			for _, dir := range nas {
				_, err := dss.CreateNasDatastore(ctx, types.HostNasVolumeSpec{
					RemoteHost: "127.0.0.1",
					RemotePath: dir,
					LocalPath:  filepath.Base(dir), // the name, as ESXi takes it
					AccessMode: string(types.HostMountModeReadWrite),
					Type:       string(types.HostFileSystemVolumeFileSystemTypeNFS),
				})
				if err != nil {
					return fmt.Errorf("nas datastore %s: %v", dir, err)
				}
			}
		}
	}
	return nil
}

// selfSigned makes a P-256 certificate for loopback, valid for a day, that is its own CA.
func selfSigned() (tls.Certificate, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	// A subject of its own: OpenSSL finds an issuer by subject, so two simulators' certificates
	// in one CA bundle must not share one.
	template := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: fmt.Sprintf("zerfaux-vcsim-%x", serial), Organization: []string{"Zerfaux tests"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pemBytes, nil
}

func sha1Sum(b []byte) []byte   { s := sha1.Sum(b); return s[:] }
func sha256Sum(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

func thumbprint(sum []byte) string {
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}
