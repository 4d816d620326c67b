// pgjdbc connections with startup parameters (currentSchema= sends search_path, options=-c ...):
// what each of their transactions sees, interleaved on shared servers.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

public final class Params {
    public static void main(String[] argv) throws Exception {
        Map<String, String> args = Out.args(argv);
        Out.watchdog(args);
        int transactions = Integer.parseInt(args.get("transactions"));
        // url_a, url_b, ...: each names one connection's extra URL parameters ("-" for none).
        List<String> labels = new ArrayList<>();
        List<Connection> conns = new ArrayList<>();
        for (Map.Entry<String, String> e : new TreeMap<>(args).entrySet()) {
            if (e.getKey().startsWith("url_") && !e.getKey().equals("url_extra")) {
                String extra = e.getValue().equals("-") ? "" : e.getValue();
                labels.add(e.getKey().substring(4));
                conns.add(DriverManager.getConnection(Out.url(args) + extra));
            }
        }
        List<Map<String, Integer>> seen = new ArrayList<>();
        List<List<String>> errors = new ArrayList<>();
        for (int i = 0; i < conns.size(); i++) {
            seen.add(new TreeMap<>());
            errors.add(new ArrayList<>());
        }
        for (int t = 0; t < transactions; t++) {
            for (int i = 0; i < conns.size(); i++) {  // round robin: the connections take turns on the servers
                Connection conn = conns.get(i);
                try {
                    conn.setAutoCommit(false);
                    String key;
                    try (Statement st = conn.createStatement();
                         ResultSet rs = st.executeQuery("SELECT current_setting('search_path'), "
                             + "current_setting('statement_timeout'), current_setting('default_transaction_isolation'), "
                             + "current_setting('transaction_isolation')")) {
                        rs.next();
                        key = "[" + Out.q(rs.getString(1)) + "," + Out.q(rs.getString(2)) + "," + Out.q(rs.getString(3))
                            + "," + Out.q(rs.getString(4)) + "]";
                    }
                    conn.commit();
                    seen.get(i).merge(key, 1, Integer::sum);
                } catch (SQLException e) {
                    errors.get(i).add(Out.error(e));
                    try {
                        conn.rollback();
                    } catch (SQLException gone) {
                        // reported above
                    }
                }
            }
        }
        for (int i = 0; i < conns.size(); i++) {
            StringBuilder sb = new StringBuilder("{\"event\":\"connection\",\"label\":" + Out.q(labels.get(i)) + ",\"seen\":{");
            boolean first = true;
            for (Map.Entry<String, Integer> e : seen.get(i).entrySet()) {
                sb.append(first ? "" : ",").append(Out.q(e.getKey())).append(":").append(e.getValue());
                first = false;
            }
            sb.append("},\"errors\":[").append(String.join(",", errors.get(i))).append("]}");
            Out.emit(sb.toString());
            conns.get(i).close();
        }
        Out.emit("{\"event\":\"done\"}");
        System.exit(0);
    }
}
